"""Letter G (Megatron's Gated DeltaNet through flash-linear-attention) on one GPU: the
``tiny_gdn`` recipe (pattern AEMFRG) built and trained with ``build_model``, and trained through
the launcher (Megatron's ``pretrain``) by the ``megacpp train`` command.

Needs the GPU extras (``make test-gpu`` checks them first): fla-core, and on Hopper TileLang,
which fla's Gated DeltaNet backward uses there. A missing one fails here, it is not skipped.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megacpp_mcore.model import build_model
from megacpp_mcore.settings.recipe import load_recipe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["te", "local"])
def test_tiny_gdn_builds_and_trains(megatron_gpu, backend):
    from megacpp_mcore.distributed import seed_everything

    seed_everything(1234)
    recipe = load_recipe("tiny_gdn")
    assert recipe.layout.has("G")
    model = build_model(recipe.layout, recipe.model, backend=backend,
                        precision=recipe.precision)
    record = model.backend_record["families"]
    assert record["G"]["built"] == backend
    gen = torch.Generator().manual_seed(0)
    batch, seq = recipe.training.micro_batch_size, recipe.model.seq_length
    tokens = torch.randint(0, 257, (batch, seq + 1), generator=gen).cuda()
    positions = torch.arange(seq, device="cuda").expand(batch, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(backend, "tiny_gdn losses", [round(x, 3) for x in losses])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    grads = [p.grad for n, p in model.named_parameters() if ".self_attention." in n
             and "decoder.layers.5." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), (
        "the G layer (layer 6) must receive finite gradients")


def test_gdn_declares_its_parts_and_fire_leaves_its_gates(megatron_gpu):
    """G's in_proj parts come from Megatron's own split table; FIRE (all) re-initialises
    q, k, v, z and the output, never beta and alpha (write strength and decay)."""
    from megacpp_mcore.distributed import seed_everything
    from megacpp_mcore.plasticity.fire import FireHook, isometry
    from megacpp_mcore.plasticity.parts import fire_targets, walk_parts
    from megacpp_mcore.train.hooks import HookContext

    seed_everything(1234)
    recipe = load_recipe("tiny_gdn")
    model = build_model(recipe.layout, recipe.model, backend="te", precision=recipe.precision)
    gdn = model.decoder.layers[5].self_attention
    parts = [p for p in walk_parts([model])[0] if p.family == "G"]
    assert [p.name for p in parts] == [*gdn.in_proj_split_names, "out"]
    assert sum(p.global_shape()[0] for p in parts[:-1]) == gdn.in_proj.weight.shape[0]
    targets = {p.name for p in fire_targets([model], "all") if p.family == "G"}
    assert targets == {"query", "key", "value", "z", "out"}
    gates = gdn.in_proj.weight.detach()[-2 * (gdn.num_value_heads // gdn.tp_size):].clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hook = FireHook([1], mode="all")
    hook.install([model], HookContext())
    hook.before_step(1, [model], optimizer)
    assert torch.equal(gdn.in_proj.weight.detach()[-gates.shape[0]:], gates)
    query = next(p for p in parts if p.name == "query")
    w = query.param.detach()[query.index()].float()
    torch.testing.assert_close(w, isometry(w), atol=2e-2, rtol=0)  # bf16 storage

def test_tiny_gdn_trains_through_the_launcher(tmp_path):
    """``megacpp train tiny_gdn --train-iters 20``: torchrun, Megatron's pretrain, the plugin's
    spec; the receipt completes with finite, falling loss."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    receipt = tmp_path / "tiny_gdn.json"
    rendezvous = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    log = tmp_path / "train.log"  # streamed, so a slow or stuck run still shows where it is
    command = [sys.executable, "-m", "megacpp_mcore.cli.main", "train", "tiny_gdn", "--device",
               "gpu", "--train-iters", "20", "--set", "training.log_interval=5",
               "--receipt", str(receipt)]
    with log.open("w") as out:
        try:
            returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        timeout=900, check=False).returncode
        except subprocess.TimeoutExpired:
            returncode = "timed out after 900 s"
    tail = log.read_text(errors="replace")[-4000:]
    print(tail)
    assert returncode == 0, (returncode, tail)
    data = json.loads(receipt.read_text())
    assert data["run"]["status"] == "completed"
    assert data["backends"]["G"]["observed"]["family"] == "gated_deltanet"
    losses = [iv["loss"] for iv in data["intervals"]]
    assert [iv["step"] for iv in data["intervals"]] == [5, 10, 15, 20]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
