"""``megacpp receipt show|compare|plot``."""

from __future__ import annotations

import json
from pathlib import Path

from megacpp_mcore.jsonio import jsonable
from megacpp_mcore.receipt.analysis import (
    compare_receipts,
    format_comparison,
    format_receipt,
    plot_receipts,
)
from megacpp_mcore.receipt.writer import SCHEMA_VERSION, load_receipt


def _cmd_show(args) -> int:
    receipt = load_receipt(args.file)
    if args.json:
        print(json.dumps(receipt.data, indent=2))
    else:
        print(format_receipt(receipt))
    return 0


def _cmd_compare(args) -> int:
    a, b = load_receipt(args.a), load_receipt(args.b)
    if args.json:
        print(json.dumps(jsonable(compare_receipts(a, b)), indent=2))
    else:
        print(format_comparison(a, b))
    return 0


def _cmd_plot(args) -> int:
    receipts = [load_receipt(f) for f in args.files]
    out = plot_receipts(receipts, args.output)
    print(f"wrote {out}")
    return 0


def add_receipt_subcommand(sub) -> None:
    """Register ``megacpp receipt show|compare|plot`` (called from cli.SUBCOMMANDS)."""
    p = sub.add_parser(
        "receipt",
        help="show, compare and plot run receipts (JSON)",
        description="Every training run writes one JSON receipt (schema_version "
        f"{SCHEMA_VERSION}): recipe, pattern and roles, backends, versions, parallel sizes, "
        "features, and per-interval loss, aux losses, throughput, MFU, memory and goodput.",
    )
    rsub = p.add_subparsers(dest="receipt_command", metavar="ACTION", required=True)
    show = rsub.add_parser(
        "show",
        help="readable summary of one receipt",
        description="Run, recipe, pattern, backends, versions, features, the last interval "
        "and goodput of one receipt.",
    )
    show.add_argument("file", type=Path, help="a receipt (.json)")
    show.add_argument("--json", action="store_true", help="print the whole receipt as JSON")
    show.set_defaults(handler=_cmd_show)

    cmp_ = rsub.add_parser(
        "compare",
        help="side-by-side table of two runs past warm-up",
        description="Compare two receipts step by step over the window where both runs are "
        "past warm-up: intervals flagged 'warmup' (by default the first warmup_intervals "
        "of each run, 1 unless the run said otherwise) are left out, the window starts at the "
        "later run's first post-warm-up step, and only steps both runs logged are shown, "
        "with the window means last.",
    )
    cmp_.add_argument("a", type=Path, help="receipt A (the baseline)")
    cmp_.add_argument("b", type=Path, help="receipt B")
    cmp_.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp_.set_defaults(handler=_cmd_compare)

    plot = rsub.add_parser(
        "plot",
        help="plot loss, aux losses and tokens/s against step (PNG)",
        description="One panel each for loss, every aux loss and tokens/s, one line per "
        "receipt (hollow markers: warm-up intervals). Needs matplotlib.",
    )
    plot.add_argument("files", type=Path, nargs="+", metavar="FILE", help="receipts (.json)")
    plot.add_argument("-o", "--output", type=Path, required=True, help="output PNG path")
    plot.set_defaults(handler=_cmd_plot)
