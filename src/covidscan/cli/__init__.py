"""``covidscan`` command line: each verb is a thin layer over the Python API.

Each verb lives in its own module exposing ``register(subparsers)``, which adds its parser and
sets ``handler`` to a function taking the parsed arguments; ``VERBS`` lists them in help order.
Heavy imports happen inside the handlers so ``covidscan --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from covidscan import __version__

VERBS = ("data", "train", "evaluate", "compare", "predict", "explain", "serve", "export", "sweep", "runs")


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
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from covidscan.config import ConfigError
    from covidscan.data.records import DataError

    try:
        result = args.handler(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"covidscan {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covidscan {args.verb}: interrupted", file=sys.stderr)
        return 130
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
