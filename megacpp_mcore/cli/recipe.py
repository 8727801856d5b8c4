"""``megacpp recipe show|describe`` and the shared ``--set`` option."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from megacpp_mcore.settings.describe import describe
from megacpp_mcore.settings.recipe import load_recipe


def _cmd_show(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    layout = recipe.layout
    if args.json:
        out = {
            "name": recipe.name,
            "source": recipe.source,
            "overrides": list(recipe.overrides),
            "hash": recipe.recipe_hash,
            "layout": layout.to_json(),
            "recipe": recipe.to_dict(),
        }
        print(json.dumps(out, indent=2))
        return 0
    counts = ", ".join(f"{n} {letter}" for letter, n in layout.counts.items() if n)
    print(f"# recipe {recipe.name} ({recipe.where})")
    print(f"# hash   {recipe.recipe_hash}")
    print(f"# layout {layout.canonical} ({layout.depth} layers: {counts}; "
          f"{len(layout.stages)} stage(s); {layout.mtp_depth} MTP depth(s))")
    sys.stdout.write(yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False))
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print(describe())
    return 0


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set KEY=VALUE`` override option (shared with ``translate``)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set model.hidden_size=2048 (repeatable; the "
        "value is read as YAML)",
    )


def add_recipe_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register ``megacpp recipe show|describe``."""
    p = sub.add_parser(
        "recipe",
        help="show a resolved recipe, or describe every recipe key",
        description="Load a recipe (recipes/NAME.yaml or a path), apply base recipes and "
        "--set overrides, validate it and show the result; or describe every key a recipe "
        "may hold. Invalid recipes exit with status 2.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="the fully resolved recipe, its hash and layout")
    show.add_argument("recipe", help="a recipe name in recipes/ (e.g. nam56r) or a YAML path")
    add_set_argument(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(handler=_cmd_show)
    desc = actions.add_parser("describe", help="every recipe key with type, default and docs")
    desc.set_defaults(handler=_cmd_describe)
