"""Hashed token n-gram features on the token embeddings (``model.ngram_hash``).

The seed system adds, to every token's embedding, features of the n-grams ending at that
token: for each order n and each of ``tables_per_order`` hash functions, the n-gram
``(t_i, t_{i-1}, ..., t_{i-n+1})`` picks one row of that function's table (positions before
the sequence start count as token -1); the rows of all tables are concatenated and projected to
the hidden size by a linear that starts at zero, so enabling the features does not change a
freshly initialised model.

Hash functions: ``h = b ^ (m_0 t_i) ^ (m_1 t_{i-1}) ^ ...`` in int64, then modulo the table's
size (a distinct prime per table); the odd multipliers ``m`` and biases ``b`` are drawn from
``hash_seed``, so every rank, every restart and every reader of a checkpoint hashes alike.
The tables and the projection are replicated over tensor parallelism (every rank computes the
whole feature and keeps its sequence chunk under sequence parallelism, whose backward gathers
the whole gradient), and their checkpoint entries are marked as replicas on pipeline stages
after the first (where the multi-token-prediction depths hold a copy of the embedding).

:func:`attach_ngram_hash` adds the module to a built model's embedding as ``ngram_hash`` and
adds its output to the word embeddings' output with a forward hook (Megatron's own embedding
module is not replaced, so its checkpoint keys and tied output weights stay as they are).
"""

from __future__ import annotations

import torch
from torch import nn

from megacpp_mcore.settings.config import NgramHashConfig

#: id standing for the positions before the sequence start
BEFORE_START = -1


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def table_sizes(count: int, at_least: int) -> list[int]:
    """``count`` distinct primes, the smallest ones at or above ``at_least``."""
    sizes, n = [], max(2, at_least)
    while len(sizes) < count:
        if _is_prime(n):
            sizes.append(n)
        n += 1
    return sizes


class NgramHashEmbedding(nn.Module):
    """``[batch, seq]`` token ids -> ``[batch, seq, hidden]`` n-gram features."""

    def __init__(self, hidden_size: int, config: NgramHashConfig,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.config = config
        self.orders = tuple(config.orders)
        per_table_order = [n for n in self.orders for _ in range(config.tables_per_order)]
        self.num_tables = len(per_table_order)
        sizes = table_sizes(self.num_tables, config.table_size)
        offsets = [sum(sizes[:i]) for i in range(self.num_tables)]
        gen = torch.Generator().manual_seed(config.hash_seed)
        max_order = max(self.orders)
        multipliers = torch.randint(1, 2**31, (self.num_tables, max_order), generator=gen) | 1
        # positions past a table's order do not take part in its hash
        used = torch.tensor([[k < n for k in range(max_order)] for n in per_table_order])
        for name, value in (("multipliers", multipliers * used),
                            ("biases", torch.randint(0, 2**31, (self.num_tables,),
                                                     generator=gen)),
                            ("sizes", torch.tensor(sizes)), ("offsets", torch.tensor(offsets))):
            self.register_buffer(name, value.to(device=device, dtype=torch.long),
                                 persistent=False)
        self.table = nn.Embedding(sum(sizes), config.embed_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(self.num_tables * config.embed_dim, hidden_size, bias=False,
                              device=device, dtype=dtype)
        with torch.no_grad():
            rows = torch.randn(self.table.weight.shape, generator=gen)
            self.table.weight.copy_(rows.to(self.table.weight.dtype))
            self.proj.weight.zero_()

    def indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Row of each table for each position: ``[batch, seq, tables]`` (int64)."""
        tokens = token_ids.long()
        batch, seq = tokens.shape
        hashed = self.biases.expand(batch, seq, self.num_tables).clone()
        for k in range(self.multipliers.shape[1]):  # the token k positions back
            back = torch.full_like(tokens, BEFORE_START)
            back[:, k:] = tokens[:, : seq - k]
            hashed ^= back[..., None] * self.multipliers[:, k]
        return torch.remainder(hashed, self.sizes) + self.offsets

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table(self.indices(token_ids))  # [batch, seq, tables, embed_dim]
        return self.proj(rows.flatten(-2))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Replicated tensors: the main copy is on the first pipeline stage; a later stage's
        copy (the MTP depths' embedding) is marked a replica, so checkpoints hold one."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        for tensor in sharded.values():
            replica = tensor.replica_id
            lead = 0 if first else 1
            tensor.replica_id = (lead, *replica[1:]) if isinstance(replica, tuple) else lead
        return sharded


def attach_ngram_hash(model: nn.Module, config: NgramHashConfig) -> None:
    """Give ``model`` (a HybridModel) the n-gram features on its embedding, if it holds one
    and ``config`` enables them; a no-op otherwise."""
    embedding = getattr(model, "embedding", None)
    if not config.enabled or embedding is None:
        return
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    weight = embedding.word_embeddings.weight
    hidden = weight.shape[1]
    embedding.ngram_hash = NgramHashEmbedding(hidden, config, embedding.config.params_dtype,
                                              weight.device)

    def add_features(module, args, output):
        features = embedding.ngram_hash(args[0]).to(output.dtype)  # [batch, seq, hidden]
        if embedding.reduce_scatter_embeddings:  # output: this rank's [seq / tp, batch, h]
            features = scatter_to_sequence_parallel_region(
                features.transpose(0, 1).contiguous(), group=embedding.tp_group)
        return output + features

    embedding.word_embeddings.register_forward_hook(add_features)
