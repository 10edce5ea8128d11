"""``covidscan`` command line: each verb is a thin layer over the Python API.

Each verb lives in its own module exposing ``register(subparsers)``, which adds its parser and
sets ``handler`` to a function taking the parsed arguments; ``VERBS`` lists them in help order.
Heavy imports happen inside the handlers so ``covidscan --help`` stays instant.

Errors: a :class:`~covidscan.errors.UserError` (bad config, data, option, missing extra) or a missing
input file prints as one line and exits 2; anything else is a bug in covidscan: a short note without
``-v`` and the full traceback with it, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from covidscan import __version__
from covidscan.errors import UserError
from covidscan.notices import dicom_notices

VERBS = (
    "data",
    "train",
    "evaluate",
    "compare",
    "crossval",
    "predict",
    "explain",
    "serve",
    "export",
    "ensemble",
    "convert",
    "sweep",
    "study",
    "runs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidscan",
        description="Train, compare, evaluate, explain and serve COVID-19 classifiers on chest CT and X-ray.",
    )
    parser.add_argument("--version", action="version", version=f"covidscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in VERBS:
        importlib.import_module(f"covidscan.cli.{verb}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that cannot be reached
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # one line per kind of DICOM header complaint, not one (or two) per file (the DICOM reader installs it)
    dicom_notices.enabled = not args.verbose
    if not args.verbose:  # pydicom both logs and warns each invalid value; here its log line says it already
        warnings.filterwarnings("ignore", message="Invalid value for VR", module=r"pydicom\.")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except (UserError, FileNotFoundError) as exc:
        logging.getLogger(__name__).debug("user error", exc_info=True)  # where it was raised, with -v
        print(f"covidscan {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covidscan {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(
            f"covidscan {args.verb}: internal error: {type(exc).__name__}: {exc}\n"
            + (
                "this is a bug in covidscan: please report it with the traceback above"
                if args.verbose
                else "this is a bug in covidscan: rerun with -v and report it with the traceback"
            ),
            file=sys.stderr,
        )
        return 1
    return int(result or 0)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeated ``--set key=value`` overrides, shared by train and sweep."""
    parser.add_argument("--config", "-c", help="YAML run config (see configs/); defaults when omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.batch_size=16 (repeatable)",
    )


if __name__ == "__main__":
    sys.exit(main())
