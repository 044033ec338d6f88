"""What the proposal command lines share: a dataset by name and an output not overwritten
by mistake."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["add_output_arguments", "parse_command"]


def add_output_arguments(parser) -> None:
    """``--toy-root`` (where the named ``ohem_toy_*`` dataset is) and ``--overwrite``."""
    parser.add_argument(
        "--toy-root",
        default=None,
        help="root of the toy dataset ohem_toy (default $DETECTRON2_DATASETS/ohem_toy)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def parse_command(parser, argv):
    """Parse ``argv`` and set up logging; None (the reason printed on stderr) if ``--out``
    exists and ``--overwrite`` is not given."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out) and not args.overwrite:
        print(f"{args.out} exists; pass --overwrite to replace it.", file=sys.stderr)
        return None
    return args
