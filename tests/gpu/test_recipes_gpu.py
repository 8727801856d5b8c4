"""Every shipped recipe builds through ``build_model`` on one GPU and trains a step.

Each recipe keeps its per-layer configuration (families, activation, norm, position
embedding, precision, backend, MoE router and dispatcher, R head sizes) at a width and depth
that fit one GPU, with every parallel size 1: the shortest prefix of its pattern that holds
every letter it uses. Run on the GPU machine: ``pytest -m gpu tests/gpu/test_recipes_gpu.py``.
"""

import pytest
import torch

from megacpp_mcore.backend import have_module
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.recipe import known_recipes, load_recipe

pytestmark = pytest.mark.gpu


def reduced(name: str):
    """The recipe at one-GPU size: same per-layer settings, smaller widths, parallel 1."""
    full = load_recipe(name)
    letters = full.layout.letters
    prefix = letters[: max(letters.index(x) for x in set(letters)) + 1]
    moe, model = full.model.moe, full.model
    overrides = [
        f"pattern={prefix}", "depth=null", "mtp_depths=0",
        "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
        f"model.num_query_groups={'null' if model.num_query_groups is None else 2}",
        "model.kv_channels=null", "model.seq_length=256", "model.vocab_size=512",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=256",
        "model.moe.shared_expert_ffn_hidden_size="
        + ("null" if moe.shared_expert_ffn_hidden_size is None else "256"),
        "model.mamba.state_dim=64", "model.mamba.head_dim=64", "model.mamba.num_groups=2",
        "model.mamba.num_heads=null",
        # Mamba-3 MIMO does not compile with TileLang 0.1.15 on H200 (refused at build): SISO
        f"model.mamba.chunk_size={64 if model.mamba.variant == 'mamba3' else 128}",
        "model.mamba.mimo=false",
        "model.recurrent.num_heads=4",
        "model.gdn.num_key_heads=2", "model.gdn.num_value_heads=4",
        "model.gdn.key_head_dim=64", "model.gdn.value_head_dim=64",
        "parallel.tensor=1", "parallel.pipeline=1", "parallel.expert=1", "parallel.context=1",
        "parallel.sequence_parallel=false", "parallel.distributed_optimizer=false",
        "parallel.fsdp=none", "training.micro_batch_size=1", "training.global_batch_size=2",
    ]
    attention, a_count = model.attention, prefix.count("A")
    if attention.mla_ranks or attention.dsa_ranks:  # the seed's split, on the prefix's A layers
        first_dsa = 1 if attention.mla_ranks else 0
        overrides += [f"model.attention.mla_ranks={[0] if attention.mla_ranks else []}",
                      f"model.attention.dsa_ranks={list(range(first_dsa, a_count))}"]
    if moe.token_dispatcher == "flex":  # DeepEP needs TP x EP > 1
        overrides.append("model.moe.token_dispatcher=alltoall")
    return load_recipe(name, overrides)


def _untrained_by_design(model, recipe) -> set[int]:
    """Parameters the LM loss cannot reach by the recipe's choice: with the DSA indexer loss
    at 0 (nam56r, as the seed trains it) nothing trains the indexer, whose inputs Megatron
    detaches."""
    if recipe.model.attention.dsa.indexer_loss_coeff > 0:
        return set()
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexer

    return {id(p) for m in model.modules() if isinstance(m, DSAIndexer)
            for p in m.parameters()}


@pytest.mark.parametrize("name", known_recipes())
def test_shipped_recipe_builds_and_steps_on_one_gpu(megatron_gpu, name):
    recipe = reduced(name)
    if recipe.layout.has("G") and not have_module("fla"):
        pytest.skip("G needs flash-linear-attention (pip install flash-linear-attention)")
    from megacpp_mcore.distributed import seed_everything

    seed_everything(1234)
    model = build_model(recipe.layout, recipe.model, backend=recipe.backend,
                        precision=recipe.precision)
    assert model.decoder.layer_letters == recipe.layout.letters
    seq, vocab = recipe.model.seq_length, recipe.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, seq + 1), generator=gen).cuda()
    positions = torch.arange(seq, device="cuda").expand(2, seq)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    assert torch.isfinite(loss), name
    untrained = _untrained_by_design(model, recipe)
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and id(p) not in untrained]
    bad = [n for n, p in model.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not bad, (name, "no gradient:", missing, "non-finite:", bad)
    assert all(p.grad is None for p in model.parameters() if id(p) in untrained), (
        name, "the DSA indexer got a gradient without its loss")
    print(name, recipe.layout.letters, "loss", round(loss.item(), 3), model.backend_record)
