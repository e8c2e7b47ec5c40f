"""User mistakes, and how command-line entry points report them.

Every error that hrnet_d2 raises for something the user gave it (a config, weights, data,
a device) derives from :class:`UserError`.  Library code raises it like any exception;
the command-line entry points (``train_net.py``, ``lazy_train_net.py``, ``demo.py``, the
tools) run their ``main`` under :func:`exit_on_user_error`, which prints the message
alone and exits with status 2.  ``--debug`` or ``HRNET_D2_DEBUG=1`` shows the traceback.
"""

import os
import sys
import time

__all__ = [
    "ArgumentValueError",
    "ConfigError",
    "ConfigValueError",
    "UserError",
    "add_debug_argument",
    "check_feature_names",
    "debug_enabled",
    "exit_on_user_error",
    "exit_on_user_error_in_worker",
    "feature_names_problem",
]

DEBUG_ENV = "HRNET_D2_DEBUG"


class UserError(Exception):
    """A mistake in what the user gave us; the message says what and how to fix it."""

    exit_code = 2


def debug_enabled(argv=None) -> bool:
    """True when tracebacks were asked for (``--debug`` on the command line or HRNET_D2_DEBUG=1)."""
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_argument(parser):
    """Add ``--debug`` (show the traceback of user-mistake errors) to an argparse parser."""
    parser.add_argument("--debug", action="store_true", help=f"show the full traceback of errors (also: {DEBUG_ENV}=1)")
    return parser


def exit_on_user_error(fn, *args, **kwargs):
    """Call ``fn``; on a :class:`UserError` print ``error: <message>`` to stderr and exit 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


# How long ranks other than 0 hold their message back (see exit_on_user_error_in_worker).
WORKER_MESSAGE_DELAY_S = 3.0


def exit_on_user_error_in_worker(fn, *args, **kwargs):
    """:func:`exit_on_user_error` for the function Detectron2's ``launch`` runs in each process.

    Every rank usually meets the same mistake (same config, same files): rank 0 prints it and
    exits 2 at once; the others hold their message back a moment, during which ``launch``'s
    parent ends them, so the message is printed once.  A mistake only one other rank meets is
    printed by that rank after the delay.  The parent then exits 2 (see ``engine.launch.launch_cli``).
    """
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        import torch.distributed as dist

        if not debug_enabled() and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            time.sleep(WORKER_MESSAGE_DELAY_S)
        return exit_on_user_error(_reraise, e)


def _reraise(error):
    raise error


class ConfigError(UserError, ValueError):
    """A config that cannot work; the message says which key and why (one line at the CLI)."""


class ConfigValueError(ConfigError):
    """A bad config value, in one line: the key, the value and what is allowed."""

    def __init__(self, key, value, allowed):
        super().__init__(f"{key} = {value!r} is invalid: {allowed}")


class ArgumentValueError(ValueError):
    """A bad constructor argument of a module (``HRNet``, ``HRNetV2p``, ...), named as the module's own
    argument, as Detectron2's modules do: ``HRNet: out_features = ['hr6'] is invalid: ...``.  The config
    validation (:mod:`hrnet_d2.config.validate`) reports it under the config key or LazyConfig path
    that gave the argument."""

    def __init__(self, owner, argument, value, allowed):
        self.owner, self.argument, self.value, self.allowed = owner, argument, value, allowed
        super().__init__(f"{owner}: {argument} = {value!r} is invalid: {allowed}")


def feature_names_problem(names, available, what):
    """What is wrong with ``names`` as a non-empty list of distinct names from ``available``
    (the ``output_shape()`` of ``what``), or None."""
    names = list(names)
    if not names:
        return f"needs at least one of {sorted(available)} ({what})"
    for name in names:
        if name not in available:
            return f"{name!r} is not produced by {what}; it produces {sorted(available)}"
    if len(set(names)) != len(names):
        return "lists a feature twice"
    return None


def check_feature_names(key, names, available, what):
    """Raise :class:`ConfigValueError` for ``key`` unless ``names`` is a non-empty list of
    distinct names from ``available`` (the ``output_shape()`` of ``what``)."""
    problem = feature_names_problem(names, available, what)
    if problem:
        raise ConfigValueError(key, list(names), problem)
