"""Training paths on CPU: the CPU main job, the LR schedule, the Megatron launcher's data,
step and receipt wiring (driven here by a hand-written stand-in for Megatron's loop, since
Megatron's pretrain needs CUDA), and the train command."""

import json
import math
import time

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training.argument_utils import hybrid_config_from_args
from megatron.training.models.hybrid import HybridModelBuilder

from megacpp_mcore.cli.main import main
from megacpp_mcore.cpu_support import adapt_model_for_cpu
from megacpp_mcore.distributed import seed_everything
from megacpp_mcore.megatron import compat, launcher
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.receipt import load_receipt
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.train.cpu_loop import lr_scheduler, train_on_cpu
from tests.megatron_helpers import parsed_megatron_args

pytestmark = pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")
SMALL = ["model.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=4",
         "training.log_interval=5", "training.lr_warmup_iters=3"]


def golden_tools_events(golden_script):
    """The plasticity events of the golden tools run (tests/assets/golden_losses.json)."""
    return json.loads(golden_script.GOLDEN.read_text())["runs"]["tiny_tools"]["events"]


def _lrs(scheduler, optimizer, steps, increment):
    """The lr each optimizer step trains at, stepping the scheduler after each as Megatron's
    train_step does."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=increment)
    return out


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_cpu_lr_schedule_is_megatrons(style):
    """The CPU loop's schedule against the one Megatron-LM itself builds from the recipe's
    flags (get_optimizer_param_scheduler) and steps (by micro-batches x micro-batch size x
    data-parallel size per iteration): the same lr at every step, from 0 at warm-up start."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training.training import get_optimizer_param_scheduler

    recipe = load_recipe("tiny", [*SMALL, "training.train_iters=14",
                                  "training.lr_warmup_iters=4", "training.min_lr=1.0e-4",
                                  f"training.lr_decay_style={style}"])
    steps = 18  # past the end of the decay too
    with parsed_megatron_args(translate(recipe, "plugin")) as args:
        reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.5)
        increment = get_num_microbatches() * args.micro_batch_size * args.data_parallel_size
        expected = _lrs(get_optimizer_param_scheduler(reference), reference, steps, increment)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.5)
    ours = _lrs(lr_scheduler(optimizer, recipe.training), optimizer, steps,
                recipe.training.global_batch_size)
    assert ours == expected
    assert ours[0] == 0.0 and ours[4] == recipe.training.lr  # warm-up from 0, as Megatron
    assert ours[-1] == (recipe.training.lr if style == "constant" else recipe.training.min_lr)


def test_cpu_main_job_trains_the_golden_curve(tmp_path, golden_script):
    """The main job on the recipe's own data source (embedded, which tests/conftest.py points
    at the frozen corpus) with the golden run's settings: each receipt interval's loss is the
    mean of the golden per-step losses it spans (tests/assets/golden_losses.json)."""
    golden = json.loads(golden_script.GOLDEN.read_text())["runs"]["tiny"]["loss"]
    recipe = load_recipe("tiny", [*golden_script.COMMON, "training.log_interval=6"])
    assert recipe.data.source == "embedded"
    receipt = train_on_cpu(recipe, receipt_path=tmp_path / "run.json", print_fn=None)
    data = load_receipt(tmp_path / "run.json").data
    assert data["run"]["status"] == "completed"
    steps = [6, 12, 18, 24]
    assert [iv["step"] for iv in data["intervals"]] == steps
    losses = [iv["loss"] for iv in data["intervals"]]
    expected = [sum(golden[step - 6:step]) / 6 for step in steps]
    assert losses == pytest.approx(expected, rel=golden_script.TOLERANCE["rtol"]), (
        "the main job left the golden tiny curve; see tests/test_golden_losses.py, or "
        "regenerate: .venv/bin/python scripts/make_golden_losses.py")
    assert expected[-1] < expected[0] - 0.8  # the golden curve itself learns
    assert data["intervals"][0]["warmup"] and not data["intervals"][1]["warmup"]
    assert "load_balancing_loss" in data["intervals"][-1]["aux_losses"]
    assert data["backends"]["R"]["observed"]["path"] == "reference"
    assert data["model"]["training_path"].startswith("cpu:")
    assert data["model"]["flops_per_token"] > 0
    goodput = data["intervals"][-1]["goodput"]["buckets"]
    assert goodput["compute"] > 0 and goodput["data_wait"] > 0
    assert goodput["warmup_compile"] > 0
    assert data["recipe"] == {"name": "tiny", "hash": recipe.recipe_hash}
    assert receipt.path == tmp_path / "run.json"
    # the loop trains each step at Megatron's scheduled lr (warm-up from 0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    lrs = _lrs(lr_scheduler(optimizer, recipe.training), optimizer, 24,
               recipe.training.global_batch_size)
    assert [iv["lr"] for iv in data["intervals"]] == [lrs[s - 1] for s in steps]


def test_train_command_on_cpu(tmp_path, capsys):
    overrides = [token for setting in SMALL for token in ("--set", setting)]
    code = main(["train", "tiny", "--device", "cpu", "--train-iters", "5",
                 "--receipt", str(tmp_path / "r.json"), *overrides])
    out = capsys.readouterr().out
    assert code == 0
    assert "training on the CPU path" in out
    assert f"receipt: {tmp_path / 'r.json'}" in out and "status completed" in out
    with pytest.raises(SystemExit):
        main(["pattern", "nam56r", "--", "--save", "x"])
    assert main(["train", "tiny", "--device", "cpu", "--", "--save", "x"]) == 2


class _MegatronStandIn(torch.optim.AdamW):
    """What the launcher reads from Megatron's optimizer (``scale_loss`` set as the model
    config's ``grad_scale_func``, ``get_loss_scale``, ``model_chunks``); Megatron's own
    optimizers need CUDA (tests/gpu runs them)."""

    def scale_loss(self, loss):
        return loss

    def get_loss_scale(self):
        return torch.tensor(1.0)


def _drive(args, model, iterations, first_iteration=0, hooks=None):
    """What Megatron's train loop does around our hooks: set curr_iteration, run the
    micro-batches through forward_step/loss_func, step the optimizer."""
    from megatron.core.utils import get_model_config

    train, _, _ = launcher.dataset_provider([64, 0, 0])
    loader = iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size))
    optimizer = _MegatronStandIn(model.parameters(), lr=1e-3)
    optimizer.model_chunks = [model]
    get_model_config(model).grad_scale_func = optimizer.scale_loss
    launcher.TRACKER = launcher.RunTracker(args, hooks)
    try:
        for iteration in range(first_iteration, first_iteration + iterations):
            args.curr_iteration = iteration
            optimizer.zero_grad()
            for _ in range(2):
                output, loss = launcher.forward_step(loader, model)
                loss_sum, tokens, report = loss(output)
                (loss_sum / tokens / 2).backward()
                assert report["lm loss"].shape == (2,)
            optimizer.step()
            if args.save and (iteration + 1) % args.save_interval == 0:
                time.sleep(0.2)  # stands in for Megatron writing a checkpoint
        launcher.TRACKER.finish("completed")
    finally:
        launcher.TRACKER = None
    return launcher


def test_launcher_wiring_writes_and_continues_the_receipt(megatron_single_process, tmp_path,
                                                          frozen_corpus):
    compat.use_shipped_dataset_helpers()
    recipe = load_recipe("tiny", [*SMALL, "backend=local"])
    receipt = tmp_path / "gpu.json"
    extra = ["--use-cpu-initialization", "--megacpp-receipt", str(receipt),
             "--save", str(tmp_path / "ckpt"), "--save-interval", "3"]
    with parsed_megatron_args(translate(recipe, "plugin"), extra) as args:
        args.data_path = [str(frozen_corpus)]
        model = HybridModelBuilder(hybrid_config_from_args(args)).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
        adapt_model_for_cpu(model)
        _drive(args, model, iterations=10)
        first = load_receipt(receipt).data
        assert [iv["step"] for iv in first["intervals"]] == [5, 10]
        assert first["run"]["status"] == "completed"
        assert first["backends"]["M"]["observed"]["built"] == "local"
        assert all(math.isfinite(iv["loss"]) for iv in first["intervals"])
        assert first["parallel"]["tensor"] == 1
        buckets = first["intervals"][-1]["goodput"]["buckets"]
        assert 0.6 <= buckets["checkpoint"] < 1.0  # saves after steps 3 and 6 and 9
        # a run resumed from a checkpoint at step 5 continues the same receipt
        _drive(args, model, iterations=5, first_iteration=5)
    resumed = load_receipt(receipt).data
    assert [iv["step"] for iv in resumed["intervals"]] == [5, 10]
    assert resumed["run"]["resumes"][0]["step"] == 5
    assert resumed["intervals"][1]["warmup"]  # the first interval after a restart


@pytest.mark.slow
def test_launcher_runs_the_plasticity_hooks(megatron_single_process, tmp_path, frozen_corpus,
                                           golden_script):
    """The plugin's flags build the hooks; before_step/after_step run at Megatron's points;
    events reach the receipt; hook state is saved per iteration and restored on resume."""
    compat.use_shipped_dataset_helpers()
    # ReDo's tau 0.9: the least active unit of these MLPs sits at 0.3-0.4 of its layer's mean
    # after 4 steps, so some unit is dormant (the batches come from the frozen corpus)
    recipe = load_recipe("tiny", [*SMALL, "backend=local", "plasticity.fire.steps=[4]",
                                  "plasticity.dash.every=3", "plasticity.dash.start=3",
                                  "plasticity.redo.every=4", "plasticity.redo.start=5",
                                  "plasticity.redo.tau=0.9"])
    receipt = tmp_path / "gpu.json"
    ckpt = tmp_path / "ckpt"
    extra = ["--use-cpu-initialization", "--megacpp-receipt", str(receipt),
             "--save", str(ckpt), "--save-interval", "3"]
    with parsed_megatron_args(translate(recipe, "plugin"), extra) as args:
        args.data_path = [str(frozen_corpus)]
        seed_everything(args.seed)  # the same weights whichever tests ran before
        model = HybridModelBuilder(hybrid_config_from_args(args)).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
        adapt_model_for_cpu(model)
        hooks = launcher.hooks_from_args(args)
        assert [h.name for h in hooks] == ["fire", "dash", "redo"]
        _drive(args, model, iterations=7, hooks=hooks)
        data = load_receipt(receipt).data
        assert data["notes"]["training_hooks"] == ["fire", "dash", "redo"]
        kinds = [(e["step"], e["kind"]) for e in data["events"]]
        assert kinds == [(3, "dash"), (4, "fire"), (5, "redo"), (6, "dash")]
        assert all(e["seconds"] >= 0 for e in data["events"])
        # FIRE and DASH touch what they touch on the CPU path's model (their counts are
        # structural: the parts FIRE resets, the rows DASH targets, as in the golden run)
        golden = {e["kind"]: e["touched"] for e in golden_tools_events(golden_script)}
        touched = {(e["step"], e["kind"]): e["touched"] for e in data["events"]}
        assert touched[4, "fire"] == golden["fire"]
        assert touched[3, "dash"] == touched[6, "dash"] == golden["dash"]
        # ReDo recycles the units it found dormant, layer by layer: on the frozen corpus this
        # deterministic run finds 469 of the 768 units of its MoE experts and MLP below tau
        redo = data["events"][2]
        assert sum(r["recycled"] for r in redo["layers"]) == redo["touched"] == 469
        assert sum(r["checked"] for r in redo["layers"]) == 768
        assert data["intervals"][-1]["goodput"]["buckets"]["plasticity"] > 0
        saved = sorted(p.parent.name for p in (ckpt / launcher.HOOK_STATE_DIR).rglob("*.pt"))
        assert saved == ["iter_0000003", "iter_0000006", "iter_0000007"]
        state = torch.load(ckpt / launcher.HOOK_STATE_DIR / "iter_0000006" / "rank00000.pt")
        assert state["step"] == 6 and state["hooks"]["dash"]["ema"]
        # resume at 6: the hooks start from the saved state, not from scratch
        args.load = str(ckpt)
        resumed = launcher.hooks_from_args(args)
        _drive(args, model, iterations=1, first_iteration=6, hooks=resumed)
        dash = next(h for h in resumed if h.name == "dash")
        redo = next(h for h in resumed if h.name == "redo")
        assert any(m.ema is not None for m in redo.mlps)
        assert dash.ema.keys() == state["hooks"]["dash"]["ema"].keys()
        # and a checkpoint without hook state is refused, naming the file
        args.curr_iteration = 5
        with pytest.raises(Exception, match="iter_0000005"):
            _drive(args, model, iterations=1, first_iteration=5,
                   hooks=launcher.hooks_from_args(args))


@pytest.mark.slow
def test_train_command_runs_all_plasticity_tools_on_cpu(tmp_path, capsys, golden_script,
                                                        frozen_corpus):
    """`megacpp train tiny` with FIRE (twice, with an lr re-warm-up), DASH, ReDo and STP
    scheduled as in the golden tools run: its receipt holds every intervention, and its
    curves and events are the golden ones (tests/assets/golden_losses.json)."""
    settings = golden_script.recipe_overrides("tiny_tools", frozen_corpus)
    overrides = [token for setting in settings for token in ("--set", setting)]
    code = main(["train", "tiny", "--device", "cpu", "--receipt", str(tmp_path / "r.json"),
                 *overrides])
    assert code == 0, capsys.readouterr().err
    data = load_receipt(tmp_path / "r.json").data
    assert data["run"]["status"] == "completed"
    assert data["notes"]["training_hooks"] == ["fire", "dash", "redo", "stp"]
    events = data["events"]
    for event in events:
        assert {"step", "kind", "touched", "seconds"} <= event.keys()
        assert isinstance(event["touched"], int) and event["seconds"] >= 0
    fire = events[0]
    assert fire["kind"] == "fire" and fire["method"] == "exact" and fire["mode"] == "all"
    redo = events[2]
    assert redo["kind"] == "redo" and {r["family"] for r in redo["layers"]} == {"E", "F"}
    assert all(r["checked"] > 0 for r in redo["layers"])
    golden = json.loads(golden_script.GOLDEN.read_text())["runs"]["tiny_tools"]
    problems = golden_script.compare({"tiny_tools": golden},
                                     {"tiny_tools": golden_script.curves(data, "tiny_tools")},
                                     **golden_script.TOLERANCE)
    assert not problems, ("`megacpp train` left the golden tools curve (see "
                          "tests/test_golden_losses.py; regenerate: .venv/bin/python "
                          "scripts/make_golden_losses.py):\n  " + "\n  ".join(problems[:12]))
    assert data["intervals"][-1]["goodput"]["buckets"]["plasticity"] > 0


def test_mtp_losses_read_megatrons_tracker_without_clearing_it():
    """The launcher's receipt gets Megatron's per-depth MTP losses (mean over micro-batches)
    from the tracker Megatron's own log reduces and clears later in the same iteration."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megacpp_mcore.train.meter import mtp_losses

    saved = dict(MTPLossLoggingHelper.tracker)
    try:
        MTPLossLoggingHelper.tracker.clear()
        assert mtp_losses(2) == {}  # no MTP layers: nothing to record
        MTPLossLoggingHelper.tracker.update(loss_values=torch.tensor([6.0, 4.0]),
                                            reduce_group=None, avg_group=None)
        assert mtp_losses(2) == {"mtp_1_loss": 3.0, "mtp_2_loss": 2.0}
        assert MTPLossLoggingHelper.tracker["loss_values"].tolist() == [6.0, 4.0]
    finally:
        MTPLossLoggingHelper.tracker.clear()
        MTPLossLoggingHelper.tracker.update(saved)
