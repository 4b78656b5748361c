"""DeepSeek-V3.2 training on a small DSA model (configs/model/tiny_v32.yaml, shrunk): the `model.index`
config section, where the indexer KL's gradients go in the sparse stage, and which parameters one
train step changes in the dense warm-up (the indexers only); frozen parameters in the optimizer."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, load_config, load_model_config
from deepseek_jax.models import build_model
from deepseek_jax.optim import indexer_only, make_optimizer
from deepseek_jax.program import build_program
from deepseek_jax.sharding import make_mesh, rules
from deepseek_jax.train import TrainState, _loss_terms
from tests.utils import ROOT

V32 = ROOT / "configs/model/tiny_v32.yaml"
SMALL = [  # 1 dense + 1 MoE layer + MTP, T = 24 > index_topk = 8: the selection is sparse
    "model.n_layers=2", "model.vocab_size=256", "model.dim=64", "model.inter_dim=96",
    "model.moe.moe_inter_dim=32", "model.index.index_topk=8", "data.seq_len=24",
    "data.global_batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=10",
]  # fmt: skip


def small_cfg(*overrides):
    return load_config([V32, ROOT / "configs/mesh/single.yaml"], [*SMALL, *overrides])


def make_batch(cfg) -> dict:
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(1, cfg.model.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((B, T), np.int32),
            "loss_mask": np.ones((B, T), bool)}  # fmt: skip


def flat(tree) -> dict:
    return {"/".join(str(k.key) for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def per_layer_any(x: np.ndarray, stacked: bool) -> np.ndarray:
    """Whether each layer's slice (or the whole leaf, when not stacked) has a non-zero entry."""
    return (x != 0).reshape(x.shape[0], -1).any(-1) if stacked else np.array([(x != 0).any()])


def random_variables(model, seed=0) -> dict:
    """Random params from the declared shapes (no init compile): norms ~1, biases 0, matrices
    N(0, 1/fan-in) with fan-in the first non-layer axis."""
    shapes = nn.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), mutable=["params", "router"])))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = "/".join(str(k.key) for k in path)
        if name.endswith("scale") or name.endswith("bias"):
            return np.full(s.shape, 1.0 if name.endswith("scale") else 0.0, np.float32)
        fan_in = s.shape[1] if is_stacked(name) and len(s.shape) > 2 else s.shape[-2]
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def is_stacked(name: str) -> bool:
    return name.startswith("layers_")


# ----------------------------------------------------------------------------------------------
# Config


def test_index_section_loads_and_is_checked():
    cfg = load_model_config([V32])
    assert cfg.index.index_topk == 64 and cfg.index.index_head_dim == 32 and not cfg.index.index_dense_warmup
    assert load_model_config([ROOT / "configs/model/tiny.yaml"]).index is None  # V3: dense MLA
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.index\.index_top_k'.*index_topk"):
        load_model_config([V32], ["model.index.index_top_k=8"])
    with pytest.raises(ConfigError, match=r"index\.index_head_dim \(8\) must be >= mla\.qk_rope_head_dim"):
        load_model_config([V32], ["model.index.index_head_dim=8"])
    with pytest.raises(ConfigError, match="DSA needs mla.q_lora_rank > 0"):
        load_model_config([V32], ["model.mla.q_lora_rank=0"])
    with pytest.raises(ConfigError, match="missing config keys: model.index.index_n_heads"):
        load_model_config([ROOT / "configs/model/tiny.yaml"], ["model.index={index_head_dim: 32, index_topk: 4}"])


# ----------------------------------------------------------------------------------------------
# Optimizer: frozen parameters


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_frozen_parameters_get_zero_updates_and_no_state(name):
    cfg = load_config([V32], [f"optim.name={name}", "optim.warmup_steps=0"])
    shapes = nn.unbox(jax.eval_shape(build_model(cfg.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes["params"])  # numpy: no eager compiles
    trainable = indexer_only(params)
    assert {k for k, t in flat(trainable).items() if t} == {k for k in flat(params) if "/indexer/" in k}
    opt = make_optimizer(cfg.optim, params, 10, trainable)
    state = jax.eval_shape(opt.init, params)
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
    n_indexer = sum(x.size for k, x in flat(params).items() if "/indexer/" in k)
    assert n_state <= 2 * n_indexer  # moments of the trained leaves only
    grads = jax.tree.map(lambda p: np.full_like(p, 0.1), params)
    updates = jax.jit(lambda g, p: opt.update(g, opt.init(p), p)[0])(grads, params)
    for k, u in flat(updates).items():
        assert (u != 0).any() == ("/indexer/" in k), k


# ----------------------------------------------------------------------------------------------
# The two stages on the small model


@pytest.fixture(scope="module")
def sparse_setup():
    cfg = small_cfg("model.num_nextn_predict_layers=0")  # compile time; the MTP block is the same Block
    model = build_model(cfg.model)
    return cfg, model, random_variables(model), make_batch(cfg)


@pytest.mark.slow
def test_sparse_stage_indexer_learns_only_from_its_kl(sparse_setup):
    """d CE / d indexer = 0 (top-k indices carry no gradient), d L_I / d rest = 0 (detached inputs,
    target without gradient): the two losses train disjoint parameter sets."""
    cfg, model, v, batch = sparse_setup

    def grads(params):
        term = lambda name: lambda p: _loss_terms(p, v["router"], batch, model, cfg)[0][name]  # noqa: E731
        return jax.grad(term("ce"))(params), jax.grad(term("index"))(params)

    g_ce, g_index = (flat(g) for g in jax.jit(grads)(v["params"]))
    for k in g_ce:
        indexer = "/indexer/" in k
        if indexer:
            assert not g_ce[k].any(), f"CE reached the indexer: {k}"
            assert per_layer_any(g_index[k], is_stacked(k)).all(), f"L_I missing in a layer of {k}"
        else:
            assert not g_index[k].any(), f"L_I reached the main model: {k}"
    main_attn = [k for k in g_ce if "/attn/w_" in k and "/indexer/" not in k and not k.startswith("mtp_")]
    assert main_attn and all(g_ce[k].any() for k in main_attn)


def one_step(cfg):
    """(state before, state after, metrics) of one train_step from random variables, one device."""
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    model, optimizer, step = p.model, p.optimizer, p.train_step
    v = random_variables(model)
    state = TrainState(
        step=jnp.int32(0), params=v["params"], router=v["router"], opt_state=jax.jit(optimizer.init)(v["params"]),
        rng=jax.random.key_data(jax.random.key(0)), bad_step=jnp.int32(-1),
    )  # fmt: skip
    after, metrics = jax.jit(step)(state, make_batch(cfg))
    return state, jax.device_get(after), jax.device_get(metrics)


@pytest.mark.slow
def test_dense_warmup_step_changes_only_the_indexers():
    """One train_step of the dense warm-up: every layer's indexer moves, nothing else does, the
    router biases included. (The sparse stage uses the stock optimizer: with the gradients above,
    CE moves the main model and L_I the indexers, so everything moves.)"""
    cfg = small_cfg("model.index.index_dense_warmup=true", "model.num_nextn_predict_layers=0")  # compile time
    before, after, metrics = one_step(cfg)
    print(f"\ndense warm-up step: loss {metrics['loss']:.3f} index_loss {metrics['index_loss']:.4f}")
    assert np.isfinite(metrics["index_loss"]) and metrics["index_loss"] > 0
    old, new = flat(before.params), flat(after.params)
    for k in old:
        moved = per_layer_any(new[k] - old[k], is_stacked(k))
        if "/indexer/" in k:
            assert moved.all(), f"an indexer did not train: {k}"
        else:
            assert not moved.any(), f"frozen parameter changed in the warm-up: {k}"
    for a, b in zip(jax.tree.leaves(before.router), jax.tree.leaves(after.router)):
        np.testing.assert_array_equal(a, b, "router biases must stay frozen in the warm-up")
