"""Checkpoints of the plugin's models through Megatron's ``dist_checkpointing`` (torch_dist).

M keeps Megatron ``MambaMixer``'s names and sharded layout (in_proj saved as z/x/B/C/dt, conv
as x/B/C), R saves its fused parameters as their declared parts, and a checkpoint written at
one tensor-parallel size loads at another with the same logits (TP 1 -> 2 -> 1 over gloo).
"""

import torch
import torch.distributed.checkpoint as dcp

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import PrecisionConfig
from tests.checkpoint_helpers import load, save_sync
from tests.conftest import tiny_model_config
from tests.distributed_helpers import run_distributed

FP32 = PrecisionConfig(params_dtype="fp32")


def _batch(seq=16, vocab=256):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, seq), generator=gen)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tokens.to(device), torch.arange(seq, device=device).expand(2, seq)


def _saved_tensors(checkpoint_dir) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every tensor in a torch_dist checkpoint, read from its files."""
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    return {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size")}


def test_mamba_mixer_has_megatron_layout(megatron_single_process, tmp_path):
    """Parameter names, shapes and dtypes of M are MambaMixer's (megatron/core/ssm/
    mamba_mixer.py, 0.19.2), and the checkpoint holds MambaMixer's keys."""
    config = tiny_model_config()
    model = build_model(parse_pattern("M"), config, precision=FP32)
    mixer = model.decoder.layers[0].mixer
    d_inner, heads = 2 * config.hidden_size, 2 * config.hidden_size // config.mamba.head_dim
    group = config.mamba.num_groups * config.mamba.state_dim
    conv = d_inner + 2 * group
    expected = {
        "in_proj.weight": ((2 * d_inner + 2 * group + heads, config.hidden_size), torch.float32),
        "conv1d_weight": ((conv, 1, config.mamba.conv_kernel), torch.float32),
        "conv1d_bias": ((conv,), torch.float32),
        "dt_bias": ((heads,), torch.float32),
        "A_log": ((heads,), torch.float32),
        "D": ((heads,), torch.float32),
        "norm.weight": ((d_inner,), torch.float32),
        "out_proj.weight": ((config.hidden_size, d_inner), torch.float32),
    }
    actual = {name: (tuple(p.shape), p.dtype) for name, p in mixer.named_parameters()}
    assert actual == expected
    assert mixer.in_proj.weight.partition_sizes == [d_inner, d_inner, group, group, heads]
    assert mixer.conv1d_weight.partition_sizes == [d_inner, group, group]
    assert mixer.fused_parts()["in_proj.weight"] == [
        ("z", d_inner), ("x", d_inner), ("B", group), ("C", group), ("dt", heads)]

    save_sync(model, tmp_path)
    prefix = "decoder.layers.0.mixer."
    saved = {k[len(prefix):]: v for k, v in _saved_tensors(tmp_path).items()
             if k.startswith(prefix)}
    rows = {"z": d_inner, "x": d_inner, "B": group, "C": group, "dt": heads}
    expected_saved = {f"in_proj.weight.{part}": (n, config.hidden_size)
                      for part, n in rows.items()}
    for part, n in (("x", d_inner), ("B", group), ("C", group)):
        expected_saved[f"conv1d.weight.{part}"] = (n, 1, config.mamba.conv_kernel)
        expected_saved[f"conv1d.bias.{part}"] = (n,)
    expected_saved.update({"dt_bias": (heads,), "A_log": (heads,), "D": (heads,),
                           "norm.weight": (d_inner,),
                           "out_proj.weight": (config.hidden_size, d_inner)})
    assert saved == expected_saved


def test_save_load_gives_identical_logits(megatron_single_process, tmp_path):
    """An A/E/M/F/R model saved and loaded into a differently seeded model: same logits."""
    from megacpp_mcore.distributed import seed_everything

    layout, config = parse_pattern("AEMFR"), tiny_model_config(seq_length=16)
    tokens, positions = _batch()
    seed_everything(1)
    saved = build_model(layout, config, precision=FP32)
    save_sync(saved, tmp_path)
    seed_everything(2)
    loaded = build_model(layout, config, precision=FP32)
    with torch.no_grad():
        expected = saved(tokens, positions, None)
        assert not torch.allclose(loaded(tokens, positions, None), expected)
        load(loaded, tmp_path)
        torch.testing.assert_close(loaded(tokens, positions, None), expected,
                                   rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TP 1 -> 2 -> 1


def _gathered_logits(model, tokens, positions) -> torch.Tensor:
    """The full-vocabulary logits of a tensor-parallel model, on the CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        local = model(tokens, positions, None).contiguous()
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1).cpu()


def _reshard(rank, world_size, root, pattern="AMFR", config=None):
    """Build at TP 1, 2, 1 (new seed each time), load the previous step's checkpoint, save.

    Returns per step: the gathered logits before and after loading (on the CPU), and the
    saved keys. Runs on CPU gloo, or on GPUs with NCCL where CUDA is present."""
    import torch.distributed as dist

    from megacpp_mcore.distributed import init_process_groups

    config = config or tiny_model_config(seq_length=16)
    tokens, positions = _batch(vocab=config.vocab_size)
    steps = []
    for step, tp in enumerate((1, 2, 1)):
        init_process_groups(tensor=tp, seed=100 + step)
        model = build_model(parse_pattern(pattern), config, precision=FP32)
        before = _gathered_logits(model, tokens, positions)
        if step:
            load(model, f"{root}/step{step - 1}")
        save_sync(model, f"{root}/step{step}")
        dist.barrier()
        after = _gathered_logits(model, tokens, positions)
        steps.append((before, after, _saved_tensors(f"{root}/step{step}")))
    return steps


def test_checkpoint_moves_between_tensor_parallel_sizes(tmp_path):
    """TP 1 -> 2 -> 1 with A, M, F and R: identical logits, identical checkpoint keys.

    (E at TP 2 needs sequence parallelism, which the CPU cannot run.)"""
    for rank_steps in run_distributed(_reshard, 2, tmp_path, str(tmp_path / "ckpt")):
        (_, tp1, keys1), (fresh2, tp2, keys2), (fresh3, tp1_again, keys3) = rank_steps
        assert not torch.allclose(fresh2, tp1) and not torch.allclose(fresh3, tp1)
        torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tp1_again, tp1, rtol=1e-5, atol=1e-5)
        assert keys1 == keys2 == keys3
        r = "decoder.layers.3.mixer."
        assert {k for k in keys1 if k.startswith(r + "in_proj.weight")} == {
            f"{r}in_proj.weight.{part}" for part in "qkvgf"}
