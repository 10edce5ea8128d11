"""``covidscan convert``: rewrite an old full-pickle checkpoint in the safe (weights-only) format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an old (full-pickle) checkpoint to the safe format; only for files you trust",
        description="covidscan loads checkpoints with weights_only=True, so a file cannot run code when it is "
        "read. Checkpoints written by older versions (or by anything else) may need full pickle; this "
        "command loads one with full pickle ONCE and rewrites it safely. Unpickling can run code hidden in "
        "the file: run it only on checkpoints whose origin you trust.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory (its checkpoints/best.pt) or .pt file")
    parser.add_argument(
        "--out", help="write here instead of in place (in place keeps the original as <name>.pickle-backup)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.checkpoint import convert_checkpoint

    path = convert_checkpoint(args.checkpoint, args.out)
    print(f"{path}: converted; it now loads without unpickling code")
    return 0
