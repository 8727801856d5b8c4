"""``megacpp translate``: a recipe as Megatron-LM flags (native or plugin)."""

from __future__ import annotations

import argparse
import json

from megacpp_mcore.cli.recipe import add_set_argument
from megacpp_mcore.megatron.translate import FORMATS, TARGETS, translate
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.supported import MEGATRON_CORE


def _cmd_translate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    command = ("megacpp", "translate", args.recipe, "--target", args.target,
               "--format", args.format, *(x for s in args.set for x in ("--set", s)))
    plan = translate(recipe, args.target, command=command)
    if args.format == "args":
        print(plan.args_line())
    elif args.format == "shell":
        print(plan.shell_script(), end="")
    else:
        print(json.dumps(plan.to_json(), indent=2))
    return 0


def add_translate_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register ``megacpp translate``."""
    p = sub.add_parser(
        "translate",
        help="translate a recipe into Megatron-LM flags (native or plugin)",
        description=f"Lower a recipe into Megatron-LM {MEGATRON_CORE} flags. --target native "
        "emits only "
        "flags stock Megatron parses and builds with its own hybrid_stack_spec (R layers are "
        "refused unless the recipe sets r_lowering, and so is any setting that needs the "
        "plugin, such as data.source embedded); --target plugin adds --spec "
        "megacpp_mcore.megatron.spec_seam megacpp_stack_spec and the plugin's --megacpp-* flags. "
        "Recipes that cannot be translated faithfully exit with status 2.",
    )
    p.add_argument("recipe", help="a recipe name in recipes/ (e.g. nam56r) or a YAML path")
    add_set_argument(p)
    p.add_argument("--target", choices=TARGETS, default="native",
                   help="native (stock Megatron) or plugin (this plugin's stack); default "
                   "native")
    p.add_argument("--format", choices=FORMATS, default="args",
                   help="args: one shell-quoted line; shell: a torchrun launch script; json: "
                   "the plan (default args)")
    p.set_defaults(handler=_cmd_translate)
