"""The logical parts of a model's weights, as its layers declare them, for plasticity tools.

A fused weight is several matrices: Megatron's QKV is interleaved per query group (view
``[ng, (np/ng + 2) * hn, h]``, split ``[np/ng * hn, hn, hn]``), a gated MLP's fc1 is
gate | up per tensor-parallel rank, the Mamba in_proj is z | x | B | C | dt, the R in_proj is
q | k | v | g | f. A :class:`Part` names the rows of one logical matrix in this rank's local
weight and the dim tensor parallelism splits (0: column parallel, 1: row parallel), so a tool
gathers exactly that matrix over the right group and never guesses from parameter names.

Sources: the project's mixers declare their parts themselves (``plasticity_parts()``);
Megatron's own modules are read here by module type (``SelfAttention``, ``MLP``,
``TEGroupedMLP``, ``MambaMixer``, MLA and DSA's absorbed MLA, ``GatedDeltaNet``), from their
own size attributes. Anything else (DSA's indexer, embeddings, the output layer, routers, norms,
biases, convolution kernels) declares nothing and is never a target; :func:`walk_parts`
reports the modules it skipped so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megacpp_mcore.layers.mixer_common import consecutive_parts
from megacpp_mcore.plasticity import sharding

#: Megatron's multi-latent attention modules (MLA; DSA's absorbed MLA), by type name
LATENT_ATTENTION = ("MLASelfAttention", "AbsorbedMLASelfAttention")
#: the parts FIRE's context_extension mode re-initialises (queries and keys only)
QUERY_KEY_PARTS = ("query", "query_down", "key")
#: FIRE target modes (``plasticity.fire.mode``).
FIRE_MODES = ("all", "attention", "context_extension")
#: parts that set time scales or carry recurrent state: never re-initialised by FIRE/DASH
#: unless asked (the forget/dt/alpha projections set decay rates, beta G's write strength;
#: W is R's state matrix).
GATE_PARTS = ("dt", "f", "beta", "alpha")
STATE_PARTS = ("state",)


@dataclass(eq=False)
class Part:
    """One logical matrix inside a (possibly fused, possibly sharded) parameter.

    ``rows``: ``((start, stop), ...)`` local row ranges of the part (None: the whole param);
    ``tp_dim``: the dim tensor parallelism splits (None: replicated); ``tp_group``: that
    group; ``family``: the block letter; ``layer``: Megatron's 1-based layer number;
    ``expert``: global expert index for routed experts; ``key``: a stable name for reports
    and state (``layer3.E.expert1.fc1.gate``).
    """

    name: str
    param: torch.nn.Parameter
    rows: tuple[tuple[int, int], ...] | None
    tp_dim: int | None
    tp_group: object
    family: str
    layer: int | None
    expert: int | None = None
    module: str = ""

    @property
    def key(self) -> str:
        expert = f".expert{self.expert}" if self.expert is not None else ""
        return f"layer{self.layer}.{self.family}{expert}.{self.module}.{self.name}"

    def index(self) -> torch.Tensor | None:
        """Local row indices of the part (None: all rows)."""
        if self.rows is None:
            return None
        return torch.cat([torch.arange(a, b) for a, b in self.rows]).to(self.param.device)

    def global_shape(self) -> tuple[int, int]:
        rows = self.param.shape[0] if self.rows is None else sum(b - a for a, b in self.rows)
        shape = [rows, self.param.shape[1]]
        if self.tp_dim is not None:
            shape[self.tp_dim] *= sharding.size(self.tp_group)
        return shape[0], shape[1]


def _qkv(attention) -> list[tuple]:
    """Megatron's interleaved QKV: per local query group, np/ng query heads, one key and one
    value head of ``hn`` rows each."""
    ng = attention.num_query_groups_per_partition
    per_group = attention.num_attention_heads_per_partition // ng
    hn = attention.hidden_size_per_attention_head
    block = (per_group + 2) * hn
    weight = attention.linear_qkv.weight
    if weight.shape[0] != ng * block:
        raise ValueError(f"linear_qkv has {weight.shape[0]} rows, expected {ng} groups x {block}")
    q = tuple((g * block, g * block + per_group * hn) for g in range(ng))
    k = tuple((g * block + per_group * hn, g * block + (per_group + 1) * hn) for g in range(ng))
    v = tuple((g * block + (per_group + 1) * hn, (g + 1) * block) for g in range(ng))
    return [("query", weight, q, 0), ("key", weight, k, 0), ("value", weight, v, 0),
            ("out", attention.linear_proj.weight, None, 1)]


def _split_dim(weight) -> int | None:
    """The dim tensor parallelism splits ``weight`` along (None: replicated, as a TE linear
    in ``duplicated`` mode)."""
    return weight.partition_dim if getattr(weight, "tensor_model_parallel", False) else None


def _latent(attention) -> list[tuple]:
    """Megatron's multi-latent attention (MLA, and DSA's absorbed MLA, same parameters):
    ``query_down`` (``linear_q_down_proj``, hidden -> q LoRA rank) and ``query``
    (``linear_q_up_proj``, or ``linear_q_proj`` without a q LoRA: per head the no-position
    and rotary dims), ``kv_down`` (``linear_kv_down_proj``: the latent shared by keys and
    values, plus the keys' rotary dims), ``key`` and ``value`` (``linear_kv_up_proj``, per
    local head ``qk_head_dim`` key rows then ``v_head_dim`` value rows), ``out``."""
    config = attention.config
    heads = attention.num_attention_heads_per_partition
    kv_up = attention.linear_kv_up_proj.weight
    k, v = config.qk_head_dim, config.v_head_dim
    if kv_up.shape[0] != heads * (k + v):
        raise ValueError(f"linear_kv_up_proj has {kv_up.shape[0]} rows, expected {heads} heads "
                         f"x ({k} key + {v} value)")
    keys = tuple((h * (k + v), h * (k + v) + k) for h in range(heads))
    values = tuple((h * (k + v) + k, (h + 1) * (k + v)) for h in range(heads))
    q_down = getattr(attention, "linear_q_down_proj", None)
    query = (attention.linear_q_up_proj if q_down is not None else attention.linear_q_proj).weight
    decl = [("query_down", q_down.weight, None, _split_dim(q_down.weight))] if q_down else []
    kv_down = attention.linear_kv_down_proj.weight
    return [*decl, ("query", query, None, 0), ("kv_down", kv_down, None, _split_dim(kv_down)),
            ("key", kv_up, keys, 0), ("value", kv_up, values, 0),
            ("out", attention.linear_proj.weight, None, 1)]


def _gated_delta_net(gdn) -> list[tuple]:
    """Megatron's ``GatedDeltaNet``: in_proj q | k | v | z | beta | alpha per rank, from the
    split table Megatron itself declares (``in_proj_split_names`` / ``_sections``, the one its
    sharded checkpoint uses); beta and alpha set write strengths and decay rates (gates)."""
    sizes = dict(zip(gdn.in_proj_split_names, gdn.in_proj_split_sections, strict=True))
    return [*consecutive_parts(gdn.in_proj.weight, sizes, tp_dim=0),
            ("out", gdn.out_proj.weight, None, 1)]


def _fc1_parts(weight, gated: bool, prefix: str = "") -> list[tuple]:
    if not gated:
        return [(f"{prefix}up", weight, None, 0)]
    half = weight.shape[0] // 2  # Megatron's gated fc1 is [gate_local | up_local] per rank
    return [(f"{prefix}gate", weight, ((0, half),), 0), (f"{prefix}up", weight,
                                                         ((half, 2 * half),), 0)]


def _mlp(mlp) -> list[tuple]:
    return [*_fc1_parts(mlp.linear_fc1.weight, mlp.config.gated_linear_unit),
            ("down", mlp.linear_fc2.weight, None, 1)]


def _mamba_mixer(mixer) -> list[tuple]:
    """Megatron's ``MambaMixer``: in_proj z | x | B | C | dt per rank, from its own sizes."""
    from megacpp_mcore.layers.mamba2 import mamba_fused_parts

    sizes = dict(mamba_fused_parts(mixer)["in_proj.weight"])
    return [*consecutive_parts(mixer.in_proj.weight, sizes, tp_dim=0),
            ("out", mixer.out_proj.weight, None, 1)]


def _declared(module) -> tuple[str, list[tuple]] | None:
    """``(family, declarations)`` of a module that declares parts, else None."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    if hasattr(module, "plasticity_parts"):
        family = "R" if type(module).__name__ == "RecurrentMixer" else "M"
        return family, module.plasticity_parts()
    if isinstance(module, SelfAttention):
        return "A", _qkv(module)
    if type(module).__name__ in LATENT_ATTENTION:
        return "A", _latent(module)
    if isinstance(module, MLP):
        return "F", _mlp(module)
    if type(module).__name__ == "MambaMixer":
        return "M", _mamba_mixer(module)
    if type(module).__name__ == "GatedDeltaNet":
        return "G", _gated_delta_net(module)
    return None


def _skippable(module) -> bool:
    """Modules with their own weights that declare no parts (reported, never targeted)."""
    name = type(module).__name__
    return any(word in name for word in ("Attention", "GatedDeltaNet", "Mixer", "Indexer"))


def walk_parts(model_chunks: Sequence[torch.nn.Module]) -> tuple[list[Part], list[str]]:
    """Every declared part of the chunks, and the module types that declared none."""
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    parts: list[Part] = []
    skipped: list[str] = []

    def visit(module, layer, in_moe, expert):
        layer = getattr(module, "layer_number", layer)
        if isinstance(module, MoELayer):
            in_moe = True
        if isinstance(module, SequentialMLP):
            base = module.ep_group.rank() * module.num_local_experts if module.ep_group else 0
            for i, mlp in enumerate(module.local_experts):
                add(mlp, "E", _mlp(mlp), layer, base + i, "expert")
            return
        if isinstance(module, TEGroupedMLP):
            base = module.ep_group.rank() * module.num_local_experts
            gated = module.config.gated_linear_unit
            for i in range(module.num_local_experts):
                decl = [*_fc1_parts(getattr(module.linear_fc1, f"weight{i}"), gated),
                        ("down", getattr(module.linear_fc2, f"weight{i}"), None, 1)]
                add(module, "E", decl, layer, base + i, "expert")
            return
        found = _declared(module)
        if found is not None:
            family, decl = found
            if family == "F" and in_moe:
                family = "E"  # the shared expert
            kind = {"A": "attention", "F": "mlp", "E": "shared_expert"}.get(family, "mixer")
            add(module, family, decl, layer, None, kind)
            core = getattr(module, "core_attention", None)
            if core is not None:  # DSA's indexer has weights of its own: report it
                visit(core, layer, in_moe, expert)
            return
        if _skippable(module) and any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            skipped.append(f"layer {layer}: {type(module).__name__}")
        for child in module.children():
            visit(child, layer, in_moe, expert)

    def add(module, family, decl, layer, expert, kind):
        group = getattr(module, "tp_group", None)
        for name, param, rows, tp_dim in decl:
            parts.append(Part(name=name, param=param, rows=rows, tp_dim=tp_dim, tp_group=group,
                              family=family, layer=layer, expert=expert, module=kind))

    for chunk in model_chunks:
        visit(chunk, None, False, None)
    return parts, skipped


def fire_targets(model_chunks: Sequence[torch.nn.Module], mode: str = "all", *,
                 include_gates: bool = False, include_state: bool = False) -> list[Part]:
    """The parts FIRE re-initialises, by block family and role.

    ``all``: every declared matrix part; ``attention``: the A layers' parts (query, key,
    value and output; for MLA/DSA also the q and kv down-projections); ``context_extension``:
    only the A layers' query and key parts (for MLA/DSA: ``linear_q_down_proj`` and
    ``linear_q_up_proj`` (or ``linear_q_proj``), and the key rows of ``linear_kv_up_proj``;
    not ``linear_kv_down_proj``, whose latent feeds the values too). DSA's indexer declares
    nothing and is reported as skipped. Never embeddings, the output layer, norms, biases,
    1-D params, convolution kernels or routers (none of them is declared); the dt/forget
    projections and R's state matrix only when asked.
    """
    if mode not in FIRE_MODES:
        raise ValueError(f"FIRE mode {mode!r}; accepted: {', '.join(FIRE_MODES)}")
    parts, _ = walk_parts(model_chunks)
    out = []
    for part in parts:
        if part.param.ndim != 2 and part.name not in STATE_PARTS:
            continue
        if part.name in GATE_PARTS and not include_gates:
            continue
        if part.name in STATE_PARTS and not include_state:
            continue
        if mode == "attention" and part.family != "A":
            continue
        if mode == "context_extension" and not (part.family == "A"
                                               and part.name in QUERY_KEY_PARTS):
            continue
        out.append(part)
    return out


def by_param(parts: Sequence[Part]) -> list[tuple[torch.nn.Parameter, list[Part]]]:
    """Parts grouped by the parameter they live in (first-seen order, same on every rank)."""
    groups: dict[int, tuple[torch.nn.Parameter, list[Part]]] = {}
    for part in parts:
        groups.setdefault(id(part.param), (part.param, []))[1].append(part)
    return list(groups.values())


def param_names(model_chunks: Sequence[torch.nn.Module]) -> dict[int, str]:
    """id(param) -> a stable name (chunk index + Megatron's parameter name), for state."""
    return {id(p): f"{i}:{name}" for i, chunk in enumerate(model_chunks)
            for name, p in chunk.named_parameters()}


def agreement_groups(parts: Sequence) -> list:
    """The groups whose ranks must decide identically about ``parts`` (all dense or all
    routed experts): each part's tensor-parallel group, and the data-parallel group of its
    replicas (the expert data-parallel group for routed experts: expert-parallel ranks hold
    other experts) when Megatron's parallel state is initialised."""
    from megatron.core import parallel_state

    groups = {id(p.tp_group): p.tp_group for p in parts if p.tp_group is not None}
    if parts and parallel_state.model_parallel_is_initialized():
        if any(p.expert is not None for p in parts):
            dp = parallel_state.get_expert_data_parallel_group()
        else:
            dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        groups[id(dp)] = dp
    return list(groups.values())


def assert_decisions_agree(what: str, decisions: Sequence[tuple]) -> None:
    """``decisions``: ``(part, digest)`` pairs (a part: anything with ``expert`` and
    ``tp_group``). Dense and routed-expert decisions are checked over their own groups."""
    from megacpp_mcore.plasticity import sharding

    for experts in (False, True):
        mine = [(p, d) for p, d in decisions if (p.expert is not None) == experts]
        sharding.assert_agree(what, [d for _, d in mine],
                              agreement_groups([p for p, _ in mine]))
