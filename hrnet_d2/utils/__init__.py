"""Helpers every wing may use: user errors, atomic file writes, safe loading, drawing."""
