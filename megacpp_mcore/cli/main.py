"""The ``megacpp`` command line.

Each subcommand is a thin shell over one module; bad input (any MegacppError) prints the
error on stderr and exits with status 2, like argparse does for bad flags. Ctrl-C exits 130
and SIGTERM (during training) 143, each with one line and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from megacpp_mcore import __version__
from megacpp_mcore.cli.bench import add_bench_subcommand
from megacpp_mcore.cli.data import add_data_subcommand
from megacpp_mcore.cli.receipt import add_receipt_subcommand
from megacpp_mcore.cli.recipe import add_recipe_subcommand
from megacpp_mcore.cli.train import add_train_subcommand
from megacpp_mcore.cli.translate import add_translate_subcommand
from megacpp_mcore.errors import MegacppError

Handler = Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------- pattern


def _cmd_pattern(args: argparse.Namespace) -> int:
    from megacpp_mcore.layout import resolve

    layout = resolve(args.pattern, args.depth)
    if args.json:
        print(json.dumps(layout.to_json(), indent=2))
        return 0
    print(f"pattern {layout.canonical}  ({layout.depth} layers, {len(layout.stages)} stage(s))")
    print(f"{'layer':>5}  letter  {'family':<15} stage")
    for layer in layout.layers:
        print(f"{layer.number:>5}  {layer.letter:^6}  {layer.family:<15} {layer.stage}")
    for layer in layout.mtp_layers:
        print(
            f"{'mtp' + str(layer.mtp_part):>5}  {layer.letter:^6}  {layer.family:<15} {layer.stage}"
        )
    counts = ", ".join(f"{n} {letter}" for letter, n in layout.counts.items() if n)
    print(f"counts: {counts}")
    print("stages: " + " | ".join(f"{s} ({len(s)})" for s in layout.stages))
    if layout.mtp:
        print(f"mtp: {layout.mtp_depth} depth(s) of {layout.mtp[0]}")
    return 0


def _add_pattern(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pattern",
        help="parse, validate and show a layer pattern or a named family",
        description="Expand a hybrid layer pattern (e.g. AEMEAEMEAEMR) or a named family from "
        "patterns/ (e.g. nam56r) to its depth and show every layer, the counts per block "
        "family and the pipeline-stage split. Invalid patterns exit with status 2.",
    )
    p.add_argument("pattern", help="a pattern such as 'AEMEAEMEAEMR' or a family name (nam56r)")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="number of main-decoder layers to tile to (default: the family's, "
        "or the pattern's own length)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.set_defaults(handler=_cmd_pattern)


# --------------------------------------------------------------------------- entry point

#: every subcommand registers itself here; later modules add their own.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_pattern,
    add_data_subcommand,
    add_receipt_subcommand,
    add_recipe_subcommand,
    add_translate_subcommand,
    add_train_subcommand,
    add_bench_subcommand,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacpp",
        description="megacpp-mcore: build, translate and train hybrid attention / Mamba / MoE / "
        "recurrent language models with Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"megacpp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first '--' passes through unchanged (e.g. Megatron flags for
    # `megacpp train RECIPE -- --save DIR`); only subcommands that accept it may get it.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough and not getattr(args, "accepts_passthrough", False):
        parser.error(f"'megacpp {args.command}' takes no arguments after '--'")
    args.megatron_args = passthrough
    handler: Handler = args.handler
    from megacpp_mcore.receipt import Terminated

    try:
        return handler(args) or 0
    except MegacppError as err:
        print(f"megacpp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the receipt (if any) already says "interrupted"
        print(f"megacpp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:  # SIGTERM: the receipt (if any) already says "terminated"
        print(f"megacpp {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return stop.code


if __name__ == "__main__":
    sys.exit(main())
