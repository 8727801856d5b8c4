"""The n-gram hash features on the token embeddings (``model.ngram_hash``): hashes as
specified, a no-op at initialisation, trained, exact under tensor + sequence parallelism,
checkpointed with the right replica ids, carried by the plugin's flags and builder, refused
where they would be dropped."""

import pytest
import torch

from megacpp_mcore.errors import RecipeError, SpecError, TranslateError
from megacpp_mcore.layers.ngram_hash import BEFORE_START, NgramHashEmbedding, table_sizes
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import NgramHashConfig, PrecisionConfig
from megacpp_mcore.settings.recipe import load_recipe
from tests.conftest import tiny_model_config
from tests.distributed_helpers import run_distributed
from tests.megatron_helpers import parsed_megatron_args

SMALL = NgramHashConfig(enabled=True, orders=(2, 3), tables_per_order=2, table_size=101,
                        embed_dim=4)
FP32 = PrecisionConfig("fp32")


def _naive_rows(module: NgramHashEmbedding, tokens: torch.Tensor) -> torch.Tensor:
    """The hash written out per position and table, in Python integers."""
    per_table_order = [n for n in module.orders for _ in range(module.config.tables_per_order)]
    out = torch.empty(*tokens.shape, module.num_tables, dtype=torch.long)
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            for t, order in enumerate(per_table_order):
                h = int(module.biases[t])
                for k in range(order):
                    token = int(tokens[b, i - k]) if i - k >= 0 else BEFORE_START
                    h ^= token * int(module.multipliers[t, k])
                out[b, i, t] = h % int(module.sizes[t]) + int(module.offsets[t])
    return out


def test_rows_follow_the_hash_and_stay_in_their_tables():
    module = NgramHashEmbedding(32, SMALL)
    tokens = torch.randint(0, 50_000, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = module.indices(tokens)
    assert torch.equal(rows, _naive_rows(module, tokens))
    starts, sizes = module.offsets, module.sizes
    assert ((rows >= starts) & (rows < starts + sizes)).all()
    assert table_sizes(3, 100) == [101, 103, 107]
    assert module.table.weight.shape[0] == sum(table_sizes(4, 101))


def test_an_ngram_picks_the_same_row_wherever_it_stands():
    """Order-2 tables see only (t_i, t_{i-1}): the same bigram at two places, same rows."""
    module = NgramHashEmbedding(32, SMALL)
    tokens = torch.tensor([[5, 7, 9, 1, 5, 7]])
    rows = module.indices(tokens)[0]
    bigram = slice(0, SMALL.tables_per_order)  # the order-2 tables come first
    assert torch.equal(rows[1, bigram], rows[5, bigram])
    assert not torch.equal(rows[1], rows[5])  # the trigrams differ (9-5-7 vs BEFORE-5-7)


def test_hashes_and_tables_come_from_the_hash_seed():
    a, b = NgramHashEmbedding(32, SMALL), NgramHashEmbedding(32, SMALL)
    tokens = torch.randint(0, 1000, (2, 16))
    assert torch.equal(a.indices(tokens), b.indices(tokens))
    assert torch.equal(a.table.weight, b.table.weight)
    other = NgramHashEmbedding(32, NgramHashConfig(**{**SMALL.__dict__, "hash_seed": 7}))
    assert not torch.equal(a.indices(tokens), other.indices(tokens))


def _model(ngram: NgramHashConfig, pattern="AF", **kwargs):
    from megacpp_mcore.distributed import seed_everything

    seed_everything(3)
    return build_model(parse_pattern(pattern), tiny_model_config(ngram_hash=ngram),
                       precision=FP32, **kwargs)


def _batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 33), generator=gen)
    return tokens[:, :-1], torch.arange(32).expand(2, 32), tokens[:, 1:]


def test_features_start_as_a_no_op_then_train(megatron_single_process):
    tokens, positions, labels = _batch()
    plain, extended = _model(NgramHashConfig()), _model(SMALL)
    assert not hasattr(plain.embedding, "ngram_hash")
    with torch.no_grad():  # the zero projection: the same model as without the features
        torch.testing.assert_close(extended(tokens, positions, None),
                                   plain(tokens, positions, None), rtol=0, atol=0)
    extended(tokens, positions, None, labels=labels).mean().backward()
    ngram = extended.embedding.ngram_hash
    assert ngram.proj.weight.grad.abs().sum() > 0  # the projection learns first
    with torch.no_grad():
        ngram.proj.weight.normal_()
        changed = extended(tokens, positions, None)
        assert (changed - plain(tokens, positions, None)).abs().max() > 1e-3
    extended.zero_grad()
    extended(tokens, positions, None, labels=labels).mean().backward()
    used = ngram.indices(tokens).unique()
    grad_rows = ngram.table.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(grad_rows.tolist()) <= set(used.tolist()) and len(grad_rows) > 0


def _tp_logits(rank, world_size, sequence_parallel=False):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megacpp_mcore.distributed import init_process_groups

    tokens, positions, _ = _batch()
    out = []
    for tp, sp in ((1, False), (2, sequence_parallel)):
        init_process_groups(tensor=tp, seed=7)
        model = _model(SMALL, "AMF", sequence_parallel=sp)
        with torch.no_grad():
            proj = model.embedding.ngram_hash.proj.weight
            proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(2)))
            logits = model(tokens, positions, None)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        dist.all_gather(parts, logits.contiguous(), group=group)
        out.append(torch.cat(parts, dim=-1))
    return out


@pytest.mark.slow
def test_tensor_parallel_2_equals_one_rank(tmp_path):
    """The tables are replicated over TP. (Sequence parallelism, where each rank keeps its
    chunk of the features, needs CUDA collectives: tests/gpu/test_ngram_hash_gpu.py.)"""
    for tp1, tp2 in run_distributed(_tp_logits, 2, tmp_path):
        torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_and_replica_ids(megatron_single_process, tmp_path, monkeypatch):
    from megatron.core import parallel_state

    from tests.checkpoint_helpers import load, save_sync

    tokens, positions, _ = _batch()
    saved = _model(SMALL)
    with torch.no_grad():
        saved.embedding.ngram_hash.proj.weight.normal_()
        saved.embedding.ngram_hash.table.weight.mul_(3)
    save_sync(saved, tmp_path)
    loaded = _model(SMALL)
    load(loaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, positions, None),
                                   saved(tokens, positions, None), rtol=0, atol=0)
    keys = [k for k in saved.sharded_state_dict() if "ngram_hash" in k]
    assert keys == ["embedding.ngram_hash.table.weight", "embedding.ngram_hash.proj.weight"]
    # on a later pipeline stage (the MTP depths' copy of the embedding) they are replicas
    monkeypatch.setattr(parallel_state, "is_pipeline_first_stage", lambda **_: False)
    later = saved.sharded_state_dict()
    assert all(later[k].replica_id[0] == 1 for k in keys)


def test_settings_validate_translate_and_round_trip():
    recipe = load_recipe("tiny", ["model.ngram_hash.enabled=true",
                                  "model.ngram_hash.orders=[2, 3, 4]"])
    line = translate(recipe, "plugin").args_line()
    assert "--megacpp-ngram-hash --megacpp-ngram-hash-orders 2 3 4" in line
    assert "--megacpp-ngram" not in translate(load_recipe("tiny"), "plugin").args_line()
    from megacpp_mcore.megatron.args import model_config_from_args

    with parsed_megatron_args(translate(recipe, "plugin")) as args:
        assert model_config_from_args(args).ngram_hash == recipe.model.ngram_hash
    with pytest.raises(TranslateError, match=r"model.ngram_hash.enabled .*--target plugin"):
        translate(load_recipe("tiny", ["model.ngram_hash.enabled=true", "r_lowering=M",
                                       "data.source=mock"]), "native")
    for sets, message in ((["model.ngram_hash.orders=[0]"], r"orders\[0\]: must be"),
                          (["model.ngram_hash.enabled=true", "model.ngram_hash.orders=[]"],
                           r"model.ngram_hash.orders is empty")):
        with pytest.raises(RecipeError, match=message):
            load_recipe("tiny", sets)


def test_the_plugin_builder_attaches_them_and_the_seam_refuses_other_builders(
        megatron_single_process):
    """Megatron's pretrain builds with the builder its model config names; the launcher names
    the plugin's. Megatron's own builder through the --spec seam would drop the features."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import hybrid_config_from_args

    from megacpp_mcore.megatron.builder import with_plugin_builder
    from megacpp_mcore.megatron.spec_seam import BUILDER_MARK

    recipe = load_recipe("tiny", ["model.ngram_hash.enabled=true", "backend=local"])
    with parsed_megatron_args(translate(recipe, "plugin"), ["--use-cpu-initialization"]) as args:
        with pytest.raises(SpecError, match=r"--megacpp-ngram-hash: .* would drop them"):
            hybrid_config_from_args(args).get_builder_cls()(
                hybrid_config_from_args(args)).build_model(
                ProcessGroupCollection.use_mpu_process_groups())
        config = with_plugin_builder(hybrid_config_from_args(args), recipe.model.ngram_hash,
                                     args)  # what the plugin's launcher does
        assert getattr(args, BUILDER_MARK)
        model = config.get_builder_cls()(config).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
    assert isinstance(model.embedding.ngram_hash, NgramHashEmbedding)
    assert model.embedding.ngram_hash.config == recipe.model.ngram_hash


def test_flops_count_the_projection_per_embedding_pass():
    """2 x (tables x embed_dim) x hidden per token, for the main pass and each MTP depth."""
    from megacpp_mcore.train.flops import flops_breakdown

    config = tiny_model_config(ngram_hash=SMALL)
    off = flops_breakdown(parse_pattern("AF/AF"), tiny_model_config())
    on = flops_breakdown(parse_pattern("AF/AF"), config)
    assert on.embedding == 2 * (2 * 2 * 4) * 64 * 2 and off.embedding == 0
    assert on.forward - off.forward == on.embedding


def test_the_plugin_model_config_serialises_like_megatrons():
    """Megatron's config container may dump, reload and deep-copy the model config: the
    plugin's subclass (and its builder) survive all three."""
    import copy

    import yaml
    from megatron.core.transformer import TransformerConfig
    from megatron.training.config.yaml_utils import safe_yaml_representers

    from megacpp_mcore.megatron.builder import MegacppHybridModelBuilder, MegacppHybridModelConfig

    config = MegacppHybridModelConfig(
        transformer=TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4),
        vocab_size=512, seq_length=128, hybrid_layer_pattern="*-", ngram_hash=SMALL)
    data = config.as_dict()
    with safe_yaml_representers():
        assert "ngram_hash" in yaml.safe_dump(data)
    for again in (MegacppHybridModelConfig.from_dict(data), copy.deepcopy(config)):
        assert again.ngram_hash == SMALL
        assert again.get_builder_cls() is MegacppHybridModelBuilder
