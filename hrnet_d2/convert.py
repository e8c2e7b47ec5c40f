"""``python -m hrnet_d2.convert``: the converter's command line, kept at its old name
(it lives in :mod:`hrnet_d2.checkpoint.__main__`)."""

import sys

from .checkpoint.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
