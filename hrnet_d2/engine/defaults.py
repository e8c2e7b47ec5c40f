"""The set-up the scripts in ``tools/`` share (as Detectron2's ``engine/defaults.py`` holds
``default_argument_parser`` and ``default_setup`` for its tools), so that each tool is a thin
script over the package: its parser with ``--config-file``, the config overrides and ``--debug``;
the loggers, the generated datasets and the checked config; one ``error:`` line and exit status 2
for a user mistake.
"""

import argparse
import sys

from detectron2.utils.logger import setup_logger

from ..config import get_hrnet_cfg
from ..config.validate import validate_config
from ..data import register_all_shapes
from ..utils.errors import add_debug_argument, exit_on_user_error

__all__ = ["run_tool", "tool_argument_parser", "tool_setup"]


def tool_argument_parser(description, *, config=True, default_config=None, opts_flag=False):
    """A tool's parser: ``description`` as help, ``--debug``, and with ``config``: ``--config-file``
    (required unless ``default_config``) and the config overrides, ``KEY VALUE ...`` after the other
    arguments or, with ``opts_flag``, after ``--opts``."""
    parser = add_debug_argument(
        argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    if not config:
        return parser
    if default_config is None:
        parser.add_argument("--config-file", required=True)
    else:
        parser.add_argument("--config-file", default=str(default_config))
    if opts_flag:
        parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    else:
        parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def tool_setup(args, *, loggers=("hrnet_d2", "detectron2")):
    """The config of ``args`` (``--config-file`` + overrides), checked (``validate_config``), with
    ``loggers`` printing to the console and the generated "shapes" datasets registered."""
    for name in loggers:
        setup_logger(name=name)
    register_all_shapes()
    cfg = get_hrnet_cfg(args.config_file, args.opts)
    validate_config(cfg)
    return cfg


def run_tool(main):
    """Run ``main(sys.argv[1:])`` as a command: a user mistake ends it with one ``error:`` line and
    exit status 2 (``--debug``: the traceback); an int that ``main`` returns is the exit status."""
    result = exit_on_user_error(main, sys.argv[1:])
    sys.exit(result if isinstance(result, int) else 0)
