"""Translation: Megatron-LM's own parser accepts what we emit, with the recipe's values.

Megatron's ``parse_and_validate_args`` runs in-process on this CPU machine, simulating the GPU
machine the flags are meant for: a Hopper device where Megatron asks for one (its TP/CP check
and its grouped-GEMM check query CUDA), ``WORLD_SIZE`` from the plan, and the plan's
environment variables. Megatron's global state is reset after every parse.
"""

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megacpp_mcore.cli.main import main
from megacpp_mcore.errors import RecipeError, TranslateError
from megacpp_mcore.megatron.args import (
    add_megacpp_args,
    model_config_from_args,
    recurrent_config_from_args,
)
from megacpp_mcore.megatron.translate import NATIVE_MODULES, PLUGIN_MODULES, SPEC, translate
from megacpp_mcore.model import ACTIVATIONS
from megacpp_mcore.plan import parse_plan, plan_layers
from megacpp_mcore.settings.recipe import known_recipes, load_recipe
from megacpp_mcore.settings.table import FIXED, SETTINGS
from megacpp_mcore.supported import MEGATRON_CORE
from megacpp_mcore.symbols import decode_symbol
from tests.megatron_helpers import megatron_parse

#: stock Megatron has no Mamba-3: the native NAM56R runs Mamba-2 at Megatron's chunk size
MAMBA2 = ["model.mamba.variant=mamba2", "model.mamba.chunk_size=128",
          "model.ngram_hash.enabled=false"]

arguments = pytest.importorskip("megatron.training.arguments")

#: Megatron's own parser passes type= to a BooleanOptionalAction (deprecated in Python 3.12)
pytestmark = pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def assert_matches(args, config, plan):
    """The parsed values are the recipe's: every row of the settings table reads back from
    Megatron's args as the recipe's value, and every TransformerConfig field a row names is
    what the row makes of it (the fixed rows too)."""
    recipe = plan.recipe
    layout, m, p = recipe.layout, recipe.model, recipe.parallel
    built = layout if plan.target == "plugin" else recipe.lowered_layout
    uses = built.letters + "".join(built.mtp)
    assert args.hybrid_layer_pattern == plan.megatron_pattern
    assert args.num_layers == layout.depth == config.num_layers
    assert args.mtp_num_layers == (layout.mtp_depth or None)
    checked = 0
    for row in SETTINGS:
        if not row.used_by(uses) or (row.flag is None and row.emit is None
                                     and row.kind != "choice"):
            continue
        if plan.target == "native" and (row.native_omits or row.plugin_only):
            continue
        if row.section == "model.attention":
            continue  # positions: by rank vs by layer, compared per position below
        want = row.value(recipe)
        if row.key == "logging.receipt_dir":  # carried as a folder ("runs" -> "runs/")
            want = want.rstrip("/") + "/"
        if row.key == "training.eval_iters" and recipe.training.eval_interval is None:
            want = 0  # no validation: Megatron gets --eval-iters 0
        assert row.read(args) == want, row.key
        for name, make in row.config_fields(recipe).items():
            value = make(want, recipe)
            value = {"activation_func": ACTIVATIONS, "params_dtype": DTYPES}.get(
                name, {}).get(value, value)
            assert _single(getattr(config, name)) == value, (row.key, name)
        checked += 1
    assert checked >= 40
    # every layer reads back as what the recipe makes it: on the plugin target from the
    # carried plan, on the native target from the symbols (decoded by the one symbol map)
    want = plan_layers(built, m, plan.target, ranked=layout)
    if plan.target == "plugin":
        assert parse_plan(args.megacpp_plan) == want
    symbols = [c for c in args.hybrid_layer_pattern if c not in "|/"]
    decoded = [decode_symbol(c) for c in symbols]
    assert decoded == [("G" if x.letter == "R" else x.letter,
                        x.variant if x.letter == "A" else None) for x in want.all_layers]
    for fixed in FIXED:
        if fixed.flag and (plan.target == "plugin" or not fixed.plugin_only_flag):
            assert getattr(config, fixed.config) == fixed.value(recipe, True), fixed.config
    assert config.bias_activation_fusion == (m.activation == "swiglu")
    assert args.use_distributed_optimizer == (p.distributed_optimizer
                                              or p.fsdp == "megatron_fsdp")
    assert args.params_dtype == DTYPES[recipe.precision.params_dtype]
    assert args.transformer_impl == ("local" if recipe.backend == "local"
                                     else "transformer_engine")
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == m.vocab_size
    assert args.padded_vocab_size >= m.vocab_size and args.padded_vocab_size % 128 == 0
    if not built.has("E"):
        assert args.num_experts is None
    if plan.target == "plugin":
        assert args.spec == list(SPEC)
        layer_plan = parse_plan(args.megacpp_plan)  # the plan travels whole, letters and variants
        assert layer_plan.layout == layout
        assert layer_plan == plan_layers(layout, recipe.model)
        assert args.megacpp_recipe_hash == recipe.recipe_hash
        assert args.megacpp_backend == recipe.backend
        parsed = model_config_from_args(args)
        sections = {"E": "moe", "M": "mamba", "R": "recurrent", "G": "gdn"}
        for f in dataclasses.fields(m):
            if f.name in sections.values() and not layout.has(
                    next(k for k, v in sections.items() if v == f.name)):
                continue  # a family the layout does not use: Megatron keeps its defaults
            if f.name == "attention":
                continue  # by rank vs by layer: compared per position in the nam56r tests
            assert getattr(parsed, f.name) == getattr(m, f.name), f.name
        if layout.has("R"):
            assert recurrent_config_from_args(args) == m.recurrent
    else:
        assert args.spec is None
        assert not [name for name in vars(args) if name.startswith("megacpp")]


def _single(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def check(name, target, overrides=()):
    plan = translate(load_recipe(name, overrides), target)
    args, config = megatron_parse(plan)
    assert_matches(args, config, plan)
    return plan, args


# --------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize(
    ("name", "target", "overrides"),
    [
        # --moe-permute-fusion needs TE >= 2.1 in TransformerConfig (absent on CPU CI)
        ("nam56r", "plugin", ["model.moe.permute_fusion=false"]),
        ("nam56r", "native", ["r_lowering=M", "model.moe.permute_fusion=false", *MAMBA2]),
        ("nam56r_quarter", "plugin", []),
        ("nam56r_quarter", "native", ["r_lowering=M", *MAMBA2]),
        ("nam56r_lite", "plugin", []),
        ("nam56r_lite", "native", ["r_lowering=M"]),
        ("nam52", "native", []),
        ("nam52", "plugin", []),
        ("tiny", "plugin", []),
        ("tiny", "native", ["r_lowering=M", "data.source=mock", "data.tokenizer=null"]),
        ("tiny_gdn", "plugin", []),
        ("tiny_gdn", "native", ["r_lowering=G", "data.source=mock", "data.tokenizer=null"]),
    ],
)
def test_megatron_accepts_shipped_recipes(name, target, overrides):
    check(name, target, overrides)



def native_overrides(name):
    """What makes a shipped recipe translatable for stock Megatron-LM: R lowered to M and
    the embedded corpus (plugin-only) replaced by mock data."""
    recipe = load_recipe(name)
    overrides = ["r_lowering=M"] if recipe.layout.has("R") else []
    if recipe.data.source == "embedded":
        overrides += ["data.source=mock", "data.tokenizer=null"]
    if recipe.layout.has("M") and recipe.model.mamba.variant == "mamba3":
        overrides += MAMBA2
    if recipe.layout.has("E") and recipe.model.moe.permute_fusion:
        # Megatron's config check wants Transformer Engine >= 2.1 for it (no TE on CPU)
        overrides += ["model.moe.permute_fusion=false"]
    return overrides


@pytest.mark.parametrize("name", known_recipes())
def test_native_output_of_every_shipped_recipe_parses_with_stock_megatron(name):
    plan, _ = check(name, "native", native_overrides(name))
    assert not any(token.startswith("--megacpp") for token in plan.argv())


def test_native_refuses_a_setting_that_needs_the_plugin(capsys):
    with pytest.raises(TranslateError) as info:
        translate(load_recipe("tiny", ["r_lowering=M"]), "native")
    message = str(info.value)
    assert "data.source ('embedded') needs the plugin: it travels in --megacpp-data" in message
    assert "--target plugin" in message and "megacpp data prepare --embedded" in message
    assert main(["translate", "tiny", "--target", "native", "--set", "r_lowering=M"]) == 2
    err = capsys.readouterr().err
    assert "data.source ('embedded') needs the plugin" in err and "Traceback" not in err


def test_nam52_native_pattern_is_megatrons_notation():
    plan = translate(load_recipe("nam52"), "native")
    assert plan.megatron_pattern == "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    assert [r["module"] for r in plan.roles[:2]] == ["megatron.core.ssm.mamba_layer.MambaLayer",
                                                     "megatron.core.ssm.mlp_layer.MLPLayer"]
    assert all(r["built_by"] == "megatron" for r in plan.roles)


# --------------------------------------------------------------------------- variations

VARIATIONS = [
    ("tiny", "plugin", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("tiny", "plugin", ["parallel.expert=2"]),
    ("tiny", "plugin", ["parallel.expert=4", "training.micro_batch_size=2"]),
    ("tiny", "plugin", ["parallel.pipeline=2"]),
    ("tiny", "plugin", ["pattern=AEM|FRA", "parallel.pipeline=2"]),
    ("tiny", "plugin", ["parallel.context=2", "pattern=AEFA"]),
    ("tiny", "plugin", ["pattern=AEMFRA/MA", "mtp_depths=1"]),
    ("tiny", "plugin", ["pattern=AEMFRA/MF/MF", "mtp_depths=2"]),
    ("tiny", "plugin", ["precision.params_dtype=bf16"]),
    ("tiny", "plugin", ["precision.params_dtype=bf16", "precision.grad_reduce_in_fp32=false"]),
    ("tiny", "plugin", ["precision.params_dtype=fp16"]),
    ("tiny", "plugin", ["parallel.distributed_optimizer=true"]),
    ("tiny", "plugin", ["parallel.fsdp=torch_fsdp2", "precision.params_dtype=bf16"]),
    ("tiny", "plugin", ["parallel.fsdp=megatron_fsdp"]),
    ("tiny", "plugin", ["model.activation=squared_relu", "model.position_embedding=none",
                        "model.normalization=LayerNorm"]),
    ("tiny", "plugin", ["model.activation=gelu", "model.tie_embeddings=true",
                        "model.kv_channels=32", "model.num_query_groups=null"]),
    ("tiny", "plugin", ["data.source=mock", "data.tokenizer=null"]),
    ("tiny", "plugin", ["data.source=path", "data.paths=[/data/a_text_document, /data/b]",
                        "data.split=90,5,5"]),
    ("tiny", "plugin", ["training.eval_interval=50", "training.eval_iters=5",
                        "training.save_interval=100", "logging.tensorboard_dir=runs/tb"]),
    ("tiny", "plugin", ["backend=local", "model.hidden_dropout=0.1",
                        "model.attention_dropout=0.05"]),
    ("tiny", "plugin", ["backend=te", "model.moe.grouped_gemm=true",
                        "model.moe.token_dispatcher=alltoall",
                        "model.moe.shared_expert_ffn_hidden_size=64",
                        "model.moe.router_score_function=sigmoid",
                        "model.moe.router_load_balancing=seq_aux_loss"]),
    ("tiny", "plugin", ["model.mamba.num_heads=4", "model.mamba.conv_kernel=3",
                        "model.mamba.chunk_size=64", "model.recurrent.backward_chunk=16"]),
    ("tiny", "plugin", ["model.mamba.variant=mamba3", "model.mamba.rope_fraction=1.0",
                        "model.mamba.mimo=true", "model.mamba.mimo_rank=2",
                        "model.mamba.chunk_size=16"]),
    ("tiny", "native", ["r_lowering=A", "data.source=path", "data.paths=[/data/text]"]),
    ("tiny", "native", ["r_lowering=F", "data.source=mock", "data.tokenizer=null"]),
    ("tiny", "native", ["r_lowering=E", "backend=te", "data.source=mock",
                        "data.tokenizer=null"]),
    ("tiny_gdn", "plugin", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("nam52", "native", ["parallel.tensor=4"]),
    ("nam52", "native", ["parallel.tensor=1", "parallel.sequence_parallel=false",
                         "parallel.context=2"]),
    ("nam52", "native", ["parallel.pipeline=4"]),
    ("nam56r_lite", "plugin", ["parallel.expert=4"]),
    ("nam56r_lite", "plugin", ["parallel.tensor=2", "parallel.sequence_parallel=true",
                          "parallel.expert=2"]),
]


@pytest.mark.parametrize(("name", "target", "overrides"), VARIATIONS,
                         ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
def test_megatron_accepts_variations(name, target, overrides):
    check(name, target, overrides)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(
    hidden=st.sampled_from([64, 128]),
    heads=st.sampled_from([2, 4, 8]),
    groups=st.sampled_from([None, 2]),
    tp=st.sampled_from([1, 2]),
    ep=st.sampled_from([1, 2, 4]),
    top_k=st.integers(1, 4),
    micro=st.sampled_from([1, 2]),
    dtype=st.sampled_from(["fp32", "bf16"]),
    pattern=st.sampled_from(["AEMFRA", "MEAR", "AEMFRA/MA", "EMA|RFA"]),
    lr=st.floats(1e-5, 1e-2),
)
def test_megatron_accepts_random_tiny_recipes(hidden, heads, groups, tp, ep, top_k, micro,
                                              dtype, pattern, lr):
    world = tp * ep
    overrides = [
        f"pattern={pattern}", f"mtp_depths={pattern.count('/')}",
        f"parallel.pipeline={pattern.count('|') + 1}",
        f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
        f"model.num_query_groups={'null' if groups is None else groups}",
        f"parallel.tensor={tp}", f"parallel.sequence_parallel={str(tp > 1).lower()}",
        f"parallel.expert={ep}", f"model.moe.top_k={top_k}",
        f"training.micro_batch_size={micro}",
        f"training.global_batch_size={micro * world * (pattern.count('|') + 1) * 2}",
        f"precision.params_dtype={dtype}", f"training.lr={lr!r}", "training.min_lr=0.0",
    ]
    try:
        recipe = load_recipe("tiny", overrides)
    except RecipeError:
        assume(False)  # an invalid combination: the loader refuses it (tested elsewhere)
    plan = translate(recipe, "plugin")
    args, config = megatron_parse(plan)
    assert_matches(args, config, plan)


# --------------------------------------------------------------------------- refusals


def test_native_refuses_r_and_names_both_ways_out():
    with pytest.raises(TranslateError) as info:
        translate(load_recipe("nam56r_lite"), "native")
    message = str(info.value)
    assert "R (recurrent, M2RNN) layers 12, 24, 36, 48" in message
    assert "--target plugin" in message and "r_lowering" in message


def test_native_refuses_local_backend_and_mamba_settings_it_cannot_express():
    with pytest.raises(TranslateError, match="Transformer-Engine-only"):
        translate(load_recipe("nam52", ["backend=local"]), "native")
    with pytest.raises(TranslateError, match=r"model\.mamba\.conv_kernel \(3\)"):
        translate(load_recipe("nam52", ["model.mamba.conv_kernel=3"]), "native")
    plan = translate(load_recipe("nam52", ["model.mamba.conv_kernel=3"]), "plugin")
    assert "--megacpp-mamba-conv-kernel" in plan.argv()
    with pytest.raises(TranslateError, match=r"model\.mamba\.variant \(mamba3\)"):
        translate(load_recipe("nam52", ["model.mamba.variant=mamba3", "parallel.tensor=1",
                                        "parallel.sequence_parallel=false"]), "native")


def test_plugin_refuses_r_in_mtp_parts():
    recipe = load_recipe("tiny", ["pattern=AEMFRA/RA", "mtp_depths=1"])
    with pytest.raises(TranslateError, match="R in multi-token-prediction layers"):
        translate(recipe, "plugin")
    plan = translate(load_recipe("tiny", ["pattern=AEMFRA/RA", "mtp_depths=1",
                                          "r_lowering=M", "data.source=mock",
                                          "data.tokenizer=null"]), "native")
    assert plan.megatron_pattern == "*EM-M*/M*"
    assert [(x["number"], x["mtp_depth"]) for x in plan.lowerings] == [(5, 0), (1, 1)]


def test_unknown_target():
    with pytest.raises(TranslateError, match="accepted: native, plugin"):
        translate(load_recipe("tiny"), "stock")


# --------------------------------------------------------------------------- the plan


def test_plan_records_every_choice():
    plan = translate(load_recipe("nam56r_lite"), "plugin")
    data = plan.to_json()
    assert data["recipe"]["name"] == "nam56r_lite" and len(data["recipe"]["hash"]) == 64
    assert data["target"] == "plugin" and data["megatron_version"] == MEGATRON_CORE
    assert data["spec"] == list(SPEC) and data["encoding"] == {"R": "G"}
    assert data["mtp_depths"] == 0 and data["pattern"]["depth"] == 52
    roles = data["roles"]
    assert len(roles) == 52 and roles[11]["letter"] == "R" and roles[11]["symbol"] == "G"
    assert roles[11]["module"] == "megacpp_mcore.specs.recurrent" and "slot" in roles[11]
    assert {r["module"] for r in roles} == {PLUGIN_MODULES[x] for x in "AEMR"}
    assert all(f["source"] or f["reason"] for f in data["flags"])
    assert data["argv"] == plan.argv() and data["launch"]["nproc_per_node"] == 8
    assert any("G' slot" in note or "'G' slot" in note for note in data["notes"])
    assert {o["field"] for o in data["omitted"]} >= {"model.gdn"}
    fixed = {f["flag"]: f["reason"] for f in data["flags"] if f["source"] is None}
    assert {"--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
            "--no-masked-softmax-fusion"} <= set(fixed)
    assert "apex" in fixed["--no-persist-layer-norm"]


def test_native_lowering_is_recorded_per_layer():
    plan = translate(load_recipe("nam56r_lite", ["r_lowering=M"]), "native")
    assert [x["number"] for x in plan.lowerings] == [12, 24, 36, 48]
    assert all(x["from"] == "R" and x["to"] == "M" for x in plan.lowerings)
    assert plan.roles[11]["lowered_to"] == "M" and plan.roles[11]["symbol"] == "M"
    assert plan.refusals and "lowered explicitly to M" in plan.refusals[0]["resolution"]
    assert not any(flag.name.startswith("--megacpp") for flag in plan.flags)


def test_native_modules_exist_and_plugin_modules_are_the_specs():
    for module, mixer in NATIVE_MODULES.values():
        for dotted in (module, mixer):
            path, _, name = dotted.rpartition(".")
            assert hasattr(importlib.import_module(path), name), dotted
    for letter, module in PLUGIN_MODULES.items():
        assert module.startswith("megacpp_mcore.specs."), letter
        assert importlib.util.find_spec(module) is not None, module


def test_env_and_world_size():
    nam52 = translate(load_recipe("nam52"), "native")
    assert nam52.nproc == 2
    assert [(e.name, e.value) for e in nam52.env] == [("CUDA_DEVICE_MAX_CONNECTIONS", "1")]
    fsdp = translate(load_recipe("tiny", ["parallel.fsdp=torch_fsdp2"]), "plugin")
    assert [(e.name, e.value) for e in fsdp.env] == [("CUDA_DEVICE_MAX_CONNECTIONS", None)]
    assert translate(load_recipe("tiny"), "plugin").env == ()
    assert translate(load_recipe("nam56r_lite"), "plugin").nproc == 8
    assert translate(load_recipe("tiny", ["parallel.context=2", "parallel.expert=4",
                                          "training.micro_batch_size=2", "pattern=AEFA"]),
                     "plugin").nproc == 4


def test_megacpp_flags_validate_their_values():
    parser = add_megacpp_args(argparse.ArgumentParser(prog="x"))
    text = "A:gqa E M:mamba2 | F R:m2rnn G / M:mamba2 A:mla"
    args = parser.parse_args(["--megacpp-plan", text, "--megacpp-r-num-heads", "8"])
    assert args.megacpp_plan == text and args.megacpp_r_num_heads == 8
    assert args.megacpp_r_k_head_dim == 64  # RecurrentConfig's default
    group = next(g for g in parser._action_groups if g.title == "megacpp")
    names = {s for a in group._group_actions for s in a.option_strings}
    assert {"--megacpp-plan", "--megacpp-recipe", "--megacpp-r-num-heads",
            "--megacpp-r-k-head-dim", "--megacpp-r-v-head-dim", "--megacpp-r-conv-kernel",
            "--megacpp-r-backward-chunk", "--megacpp-receipt", "--megacpp-data"} <= names
    for bad in (["--megacpp-plan", "A:gqa X M:mamba2"], ["--megacpp-plan", "A:gqa M"],
                ["--megacpp-plan", "A:sparse E"], ["--megacpp-r-num-heads", "0"],
                ["--megacpp-data", "web"]):
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as info:
            parser.parse_args(bad)
        assert info.value.code == 2


# --------------------------------------------------------------------------- command line


def test_cli_native_nam56r_exits_2(capsys):
    assert main(["translate", "recipes/nam56r_lite.yaml", "--target", "native"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megacpp translate: error: recipes/nam56r_lite.yaml: cannot translate")
    assert "layers 12, 24, 36, 48" in err and "--target plugin" in err and "r_lowering" in err


def test_cli_plugin_args_are_accepted_by_megatron(capsys):
    assert main(["translate", "recipes/nam56r_lite.yaml", "--target", "plugin", "--format",
                 "args"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    plan = translate(load_recipe("nam56r_lite"), "plugin")
    assert line == plan.args_line()
    args, config = megatron_parse(plan)
    assert_matches(args, config, plan)


def test_cli_json_plan(capsys):
    assert main(["translate", "nam56r_lite", "--target", "plugin", "--format", "json",
                 "--set", "training.lr=1e-4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"]["overrides"] == ["training.lr=1e-4"]
    for key in ("recipe", "target", "megatron_version", "roles", "mtp_depths", "flags",
                "lowerings", "refusals", "omitted", "argv", "launch"):
        assert key in data
    lr = next(f for f in data["flags"] if f["flag"] == "--lr")
    assert lr == {"flag": "--lr", "values": ["0.0001"], "source": "training.lr",
                  "reason": None}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("name", "target"), [("nam56r_lite", "plugin"), ("nam52", "native"),
                                              ("tiny", "plugin")])
def test_cli_shell_script_is_valid_bash(capsys, tmp_path, name, target):
    assert main(["translate", name, "--target", target, "--format", "shell"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/usr/bin/env bash\n")
    plan = translate(load_recipe(name), target)
    assert f"torchrun --nproc-per-node {plan.nproc} scripts/pretrain_nam.py" in script
    path = tmp_path / "launch.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    # run it with a stand-in torchrun: it receives exactly the plan's flags and environment
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "${CUDA_DEVICE_MAX_CONNECTIONS-unset}" '
                    '"$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(path)], check=True, capture_output=True, text=True,
                         env=env).stdout.splitlines()
    assert out[1:] == ["--nproc-per-node", str(plan.nproc), "scripts/pretrain_nam.py",
                       *plan.argv()]
    assert out[0] == ("1" if plan.env else os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS",
                                                            "unset"))


# --------------------------------------------------------------------------- NAM56R as the seed


def test_nam56r_native_refuses_mamba3_naming_the_way_out():
    """Stock Megatron-LM has no Mamba-3: the seed's M is refused, never remapped."""
    with pytest.raises(TranslateError) as info:
        translate(load_recipe("nam56r", ["r_lowering=M", "model.moe.permute_fusion=false"]),
                  "native")
    assert "model.mamba.variant (mamba3)" in str(info.value)
    assert "--target plugin" in str(info.value)


def test_nam56r_native_is_the_seed_model():
    """Done-when of issue 12: stock Megatron accepts the native NAM56R with '+' at layers
    1/17/33/49, 'D' at the other nine A positions, MLA flags, MTP depth 2, the seed's MoE."""
    plan = translate(load_recipe("nam56r", ["r_lowering=M", "model.moe.permute_fusion=false",
                                            *MAMBA2]), "native")
    main_pattern, *mtp = plan.megatron_pattern.split("/")
    a_layers = [n for n, c in enumerate(main_pattern, start=1) if c in "*+D"]
    assert [n for n in a_layers if main_pattern[n - 1] == "+"] == [1, 17, 33, 49]
    assert [n for n in a_layers if main_pattern[n - 1] == "D"] == [5, 9, 13, 21, 25, 29, 37,
                                                                   41, 45]
    assert "*" not in plan.megatron_pattern and mtp == ["+-", "+-"]
    assert [x["number"] for x in plan.lowerings] == [12, 24, 36, 48]
    args, config = megatron_parse(plan)
    assert args.multi_latent_attention and args.experimental_attention_variant == "dsa"
    assert (args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim,
            args.v_head_dim) == (64, 64, 64, 64, 64)
    assert (args.dsa_indexer_n_heads, args.dsa_indexer_head_dim, args.dsa_indexer_topk) == (
        8, 64, 256)
    assert args.dsa_indexer_rotate_activation is True  # native keeps the seed's setting
    assert args.mtp_num_layers == 2
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size,
            args.moe_shared_expert_intermediate_size) == (16, 4, 896, 1024)
    assert args.moe_token_dispatcher_type == "flex" and args.moe_router_dtype == "fp32"
    assert args.moe_aux_loss_coeff == 0.0 and not args.swiglu  # GELU: Megatron's default
    assert type(config).__name__ == "MLATransformerConfig"


def test_cli_translates_nam56r_native_with_r_lowering(capsys):
    assert main(["translate", "nam56r", "--target", "native", "--set", "r_lowering=M",
                 *[x for s in MAMBA2 for x in ("--set", s)], "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pattern"]["megatron"].startswith("+EMED") and data["mtp_depths"] == 2
    assert [x["to"] for x in data["lowerings"]] == ["M"] * 4
    roles = {r["number"]: r for r in data["roles"] if not r["mtp_depth"]}
    assert roles[17]["attention"] == "mla" and roles[5]["attention"] == "dsa"
    assert roles[5]["mixer"].endswith("AbsorbedMLASelfAttention")


def test_nam56r_plugin_carries_variants_and_the_seed_r_layer():
    plan = translate(load_recipe("nam56r", ["model.moe.permute_fusion=false"]), "plugin")
    args, _ = megatron_parse(plan)
    assert args.hybrid_layer_pattern.count("+") == 4 + 2 and args.hybrid_layer_pattern.count(
        "D") == 9
    r = recurrent_config_from_args(args)
    assert r == load_recipe("nam56r").model.recurrent and r.heads(4096) == 51
    model = model_config_from_args(args)
    recipe = load_recipe("nam56r")
    carried = parse_plan(args.megacpp_plan)  # the variants travel in the plan, whole
    assert carried == plan_layers(recipe.layout, recipe.model)
    assert [x.number for x in carried.layers if x.variant == "mla"] == [1, 17, 33, 49]
    assert {x.variant for x in carried.mtp_layers if x.letter == "A"} == {"mla"}
    want = recipe.model.attention
    assert model.attention.mla == want.mla and model.attention.dsa == want.dsa
