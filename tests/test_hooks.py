"""The training-hook contract on the CPU loop: called at the documented points, in order."""

import pytest

from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.train.cpu_loop import train_on_cpu
from megacpp_mcore.train.hooks import HookList, TrainingHook


class Recorder(TrainingHook):
    name = "recorder"
    goodput_bucket = "plasticity"

    def __init__(self):
        self.calls = []

    def install(self, model_chunks, context):
        self.calls.append(("install", context.num_microbatches, context.path))

    def before_step(self, step, model_chunks, optimizer):
        # the safe point: no gradient of this iteration exists yet
        assert all(p.grad is None for m in model_chunks for p in m.parameters())
        self.calls.append(("before", step))

    def after_step(self, step, model_chunks, optimizer):
        assert optimizer.state, "after_step runs after the optimizer step"
        self.calls.append(("after", step))

    def metrics(self):
        return {"recorder_metric": 2.0}

    def events(self):
        step = self.calls[-1][1]
        return [{"step": step, "kind": "probe", "touched": 0, "seconds": 0.0}] if step == 2 else []


@pytest.mark.slow
def test_cpu_loop_calls_the_contract(tmp_path):
    recipe = load_recipe("tiny", ["training.train_iters=3", "training.log_interval=1",
                                    "training.lr_warmup_iters=1"])
    hook = Recorder()
    receipt = train_on_cpu(recipe, receipt_path=tmp_path / "r.json", print_fn=None,
                           hooks=HookList([hook]))
    micro = recipe.training.global_batch_size // recipe.training.micro_batch_size
    assert hook.calls == [("install", micro, "cpu"), ("before", 1), ("after", 1),
                          ("before", 2), ("after", 2), ("before", 3), ("after", 3)]
    assert [iv["aux_losses"]["recorder_metric"] for iv in receipt.intervals] == [2.0] * 3
    assert receipt.data["events"] == [{"step": 2, "kind": "probe", "touched": 0,
                                       "seconds": 0.0}]
    assert "plasticity" in receipt.intervals[-1]["goodput"]["buckets"]


def test_hook_names_are_distinct():
    with pytest.raises(ValueError, match="distinct"):
        HookList([Recorder(), Recorder()])
