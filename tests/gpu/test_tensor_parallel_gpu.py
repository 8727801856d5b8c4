"""Tensor parallel 2 with sequence parallel on two GPUs equals TP=1 (what the CPU cannot run:
Megatron's sequence-parallel gathers allocate on CUDA). ``pytest -m gpu tests/gpu``."""

import pytest
import torch

from tests.compare import rel_err
from tests.distributed_helpers import run_distributed

pytestmark = pytest.mark.gpu


def _tp_logits(rank, world_size, pattern, backend, ngram_hash=False):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.layout import parse_pattern
    from megacpp_mcore.model import build_model
    from megacpp_mcore.settings.config import NgramHashConfig, PrecisionConfig
    from tests.gpu.test_model_gpu import gpu_model_config

    config = gpu_model_config()
    if ngram_hash:  # replicated tables; under SP each rank keeps its chunk of the features
        from dataclasses import replace

        config = replace(config, ngram_hash=NgramHashConfig(
            enabled=True, tables_per_order=2, table_size=1009, embed_dim=8))

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 256), generator=gen).cuda()
    positions = torch.arange(256, device="cuda").expand(2, 256)
    results = []
    state = None
    for tp in (1, 2):
        init_process_groups(tensor=tp, seed=7)
        model = build_model(parse_pattern(pattern), config, backend=backend,
                            precision=PrecisionConfig("fp32"), sequence_parallel=tp > 1)
        if state is None and ngram_hash:  # a projection that is not zero: features count
            with torch.no_grad():
                model.embedding.ngram_hash.proj.weight.normal_(0, 0.02)
        if state is None:  # TP=1: keep the full weights
            state = {k: v.detach().clone() if torch.is_tensor(v) else v
                     for k, v in model.state_dict().items()}
        else:  # TP=2: load this rank's shard of the same weights
            _load_shards(model, state, parallel_state.get_tensor_model_parallel_rank())
        with torch.no_grad():
            logits = model(tokens, positions, None)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        dist.all_gather(parts, logits.contiguous(), group=group)
        results.append(torch.cat(parts, dim=-1).cpu())
    return results


def _load_shards(model, full_state, rank):
    """Copy the TP=1 weights into a TP=2 model: split tensor-parallel parameters by their
    partition dim, the fused projections of M and R part by part."""
    from megacpp_mcore.layers.mixer_common import local_parts

    params = dict(model.named_parameters())
    local = model.state_dict()
    for name, value in local.items():
        if name.endswith("_extra_state"):
            continue
        full = full_state[name]
        param = params.get(name)
        if param is None or not getattr(param, "tensor_model_parallel", False) or (
                full.shape == value.shape):
            local[name] = full
            continue
        dim = param.partition_dim
        parts = _fused_parts(model, name, full.shape[dim])
        if parts is not None and dim == 0:
            local[name] = local_parts(list(full.split(parts)), rank, 2)
        else:
            local[name] = full.chunk(2, dim=dim)[rank]
    model.load_state_dict(local)


def _fused_parts(model, name, size):
    """Logical part sizes of a fused projection: gate | up of a gated MLP's fc1, the parts of
    the M and R input projections and convolutions (None for plain tensors)."""
    if name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit:
        return [size // 2, size // 2]
    module = model.get_submodule(name.rsplit(".", 2)[0] if ".in_proj." in name
                                 else name.rsplit(".", 1)[0])
    for owner in (module, getattr(module, "mixer", None)):
        if owner is None:
            continue
        if hasattr(owner, "d_state"):  # Mamba2Mixer
            g = owner.ngroups * owner.d_state
            table = {"in_proj": [owner.d_inner, owner.d_inner, g, g, owner.nheads],
                     "conv1d": [owner.d_inner, g, g]}
        elif hasattr(owner, "k_head_dim"):  # RecurrentMixer
            H, K, V = owner.num_heads, owner.k_head_dim, owner.v_head_dim
            table = {"in_proj": [H * K, H * K, H * V, H * V, H],
                     "conv1d": [H * K, H * K, H * V]}
        else:
            continue
        key = "in_proj" if ".in_proj." in name else "conv1d" if "conv1d" in name else None
        if key and sum(table[key]) == size:
            return table[key]
    return None


# Transformer Engine runs fp32 GEMMs in TF32 whatever torch's flags say (cublaslt_gemm.cu:
# "Use TF32 only for pure FP32 GEMM"); TP=2 splits their sums differently, so its TP1/TP2
# drift is TF32 rounding (9e-5 measured on an H200), the local modules' fp32 (1e-6). A wrong
# split or a lost all-reduce is off by far more than either.
TOLERANCE = {"local": 1e-4, "te": 5e-4}


@pytest.mark.parametrize("backend", ["local", "te"])
def test_tp2_sequence_parallel_equals_tp1(backend, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    # A, M, F and R with sequence parallel (experts are split differently and left out).
    for tp1, tp2 in run_distributed(_tp_logits, 2, tmp_path, "AMFRA", backend):
        error = rel_err(tp2, tp1)
        print(backend, "TP2+SP vs TP1 logits rel err", error)
        assert error < TOLERANCE[backend]


def test_tp2_sequence_parallel_equals_tp1_with_ngram_hash(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for tp1, tp2 in run_distributed(_tp_logits, 2, tmp_path, "AMFA", "te", True):
        error = rel_err(tp2, tp1)
        print("n-gram hash TP2+SP vs TP1 logits rel err", error)
        assert error < TOLERANCE["te"]
