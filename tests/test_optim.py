"""The optimizer: schedule values, Muon/AdamW grouping of the tiny model, per-slice Muon,
clipping, weight-decay mask, and that steps run and descend."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from deepseek_jax.config import EngramConfig, OptimConfig, load_model_config
from deepseek_jax.models import build_model
from deepseek_jax.optim import (
    MUON_MATRICES,
    decay_mask,
    lr_schedule,
    make_optimizer,
    muon_dimension_numbers,
    param_groups,
)
from tests.utils import CONFIGS

TINY = CONFIGS / "model" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_abstract():
    cfg = load_model_config([TINY])
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens))["params"]


def flat(tree, is_leaf=None) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return {"/".join(str(k.key) for k in path): x for path, x in leaves}


def random_like(tree, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no per-shape compile
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def first_update(cfg, params, grads, total_steps=10):
    opt = make_optimizer(cfg, params, total_steps)
    return jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)


def test_schedule_values():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = lr_schedule(cfg, total_steps=110)
    want = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-4 + 0.5 * 9e-4, 110: 1e-4, 500: 1e-4}
    for step, value in want.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-12, err_msg=str(step))
    np.testing.assert_allclose(float(lr_schedule(cfg, 110, peak=0.02)(10)), 0.02, rtol=1e-6)
    no_warmup = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=0), total_steps=100)
    np.testing.assert_allclose(float(no_warmup(0)), 1e-3, rtol=1e-6)


def test_tiny_model_groups(tiny_abstract):
    groups = flat(param_groups(tiny_abstract))
    assert groups.keys() == flat(tiny_abstract).keys()
    for name, group in groups.items():
        leaf = name.rsplit("/", 1)[-1]
        assert group == ("muon" if leaf in MUON_MATRICES else "adamw"), name
    for name in ("embedding", "w_head", "final_norm/scale", "layers_1_3/block_0/ffn/w_router",
                 "mtp_0/block/ffn/w_router", "layers_1_3/block_0/attn/q_norm/scale"):
        assert groups[name] == "adamw", name
    for name in ("layers_1_3/block_0/attn/w_uq", "layers_0/block_0/ffn/w_gate", "layers_1_3/block_0/ffn/w_down",
                 "layers_1_3/block_0/ffn/shared/w_up", "mtp_0/w_eh", "mtp_0/block/attn/w_o"):
        assert groups[name] == "muon", name
    # 6 MLA matrices per block (w_q absent with a query latent); dense: +3 FFN; MoE: +3 shared +3
    # routed; MTP: a MoE block + w_eh  ->  9 + 12 + 13
    assert sum(g == "muon" for g in groups.values()) == 34


def test_tiny_model_dimension_numbers(tiny_abstract):
    dims = flat(muon_dimension_numbers(tiny_abstract), is_leaf=lambda x: isinstance(x, Dims))
    assert dims["layers_1_3/block_0/ffn/w_gate"] == Dims((2,), (3,))  # [L, E, D, F]
    assert dims["layers_1_3/block_0/ffn/w_down"] == Dims((2,), (3,))  # [L, E, F, D]
    assert dims["layers_1_3/block_0/ffn/shared/w_gate"] == Dims((1,), (2,))  # [L, D, F]
    assert dims["layers_0/block_0/attn/w_uq"] == Dims((1,), (2, 3))  # [L, Q, N, H+R]
    assert dims["layers_1_3/block_0/attn/w_o"] == Dims((1, 2), (3,))  # [L, N, O, D]
    assert dims["mtp_0/block/attn/w_o"] == Dims((0, 1), (2,))  # [N, O, D], no layer axis
    assert dims["mtp_0/block/ffn/w_up"] == Dims((1,), (2,))  # [E, D, F]
    assert dims["mtp_0/w_eh"] == Dims((0,), (1,))
    assert muon_dimension_numbers({"norm": {"scale": jnp.ones(3)}}) == {"norm": {"scale": None}}


def test_unknown_matrix_raises():
    params = {"attn": {"w_new": jnp.zeros((4, 4)), "scale": jnp.ones(4)}}
    with pytest.raises(ValueError, match="w_new.*MUON_MATRICES or ADAMW_PARAMS"):
        param_groups(params)
    for name in ("adamw", "muon"):
        with pytest.raises(ValueError, match="w_new"):
            make_optimizer(OptimConfig(name=name), params, 10)
    assert param_groups({"attn": {"gain": jnp.ones(4)}}) == {"attn": {"gain": "adamw"}}  # 1-D: ok
    with pytest.raises(ValueError, match="w_gate"):  # too many leading axes for a [D, F] matrix
        param_groups({"ffn": {"w_gate": jnp.zeros((2, 2, 2, 4, 4))}})


def test_numbered_audio_convs_are_muon():
    """Any number of audio convs (audio.conv_strides has no length cap): w_conv8, w_conv12 too."""
    params = {"media": {"audio": {f"w_conv{i}": jnp.zeros((3, 4, 6)) for i in (0, 8, 12)}}}
    params["media"]["audio"]["w_convx"] = jnp.zeros((3, 4, 6))  # not a numbered name: still unknown
    with pytest.raises(ValueError, match="w_convx"):
        param_groups(params)
    del params["media"]["audio"]["w_convx"]
    assert set(flat(param_groups(params)).values()) == {"muon"}
    dims = flat(muon_dimension_numbers(params), is_leaf=lambda x: isinstance(x, Dims))
    assert dims["media/audio/w_conv8"] == Dims((0, 1), (2,))  # [3, I, C]: taps × input channels in


def test_muon_orthogonalises_each_layer_and_expert():
    cfg = OptimConfig(name="muon", lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    g_LEDF = np.random.default_rng(0).normal(size=(2, 3, 8, 12)).astype(np.float32)

    def first_update_fn(name, shape):
        params = {"ffn": {name: jnp.zeros(shape)}}
        opt = make_optimizer(cfg, params, 10)
        state = opt.init(params)
        return jax.jit(lambda g: opt.update({"ffn": {name: g}}, state, params)[0]["ffn"][name])

    u_LEDF = np.asarray(first_update_fn("w_gate", g_LEDF.shape)(g_LEDF))  # batch axes L, E
    slice_update = first_update_fn("w_gate", (8, 12))  # a dense MLP's [D, F] w_gate
    for l in range(2):
        for e in range(3):
            u_DF = np.asarray(slice_update(g_LEDF[l, e]))
            np.testing.assert_allclose(u_LEDF[l, e], u_DF, rtol=1e-5, atol=1e-6)
            s = np.linalg.svd(-u_DF / (0.2 * np.sqrt(12)), compute_uv=False)
            assert 0.5 < s.min() and s.max() < 1.5, s  # Newton-Schulz: singular values ~ 1
            rms = np.sqrt(np.mean(u_DF**2))
            assert 0.1 < rms < 0.3, rms  # RMS-matched to AdamW's ~0.2 at lr = 1
    # and the slices are not orthogonalised together as one [L·E·D, F] matrix
    u_whole = np.asarray(first_update_fn("w_dq", (48, 12))(g_LEDF.reshape(48, 12)))
    assert not np.allclose(u_whole.reshape(u_LEDF.shape), u_LEDF, atol=1e-2)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_clipping_caps_global_norm(name):
    cfg = OptimConfig(name=name, clip_norm=1.0, warmup_steps=0)
    params = {
        "attn": {"w_o": jnp.zeros((2, 3, 4))}, "w_head": jnp.zeros((4, 5)),
        "norm": {"scale": jnp.ones(4)},
    }
    for size, want in ((10.0, 1.0), (0.5, 0.5)):
        grads = random_like(params, seed=1)
        grads = jax.tree.map(lambda g: g * size / optax.tree.norm(grads), grads)
        _, state = first_update(cfg, params, grads)
        # first momentum = (1 - β)·clipped grad; Adam's β = b1, Muon's 0.95 (see optim.py)
        seen = 0.0
        for path, mu in optax.tree.get_all_with_path(state, "mu"):
            beta = 0.95 if "Muon" in str(path) else cfg.b1
            seen += float(optax.tree.norm(mu)) ** 2 / (1 - beta) ** 2
        np.testing.assert_allclose(np.sqrt(seen), want, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_only_on_matrices(name):
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.1, warmup_steps=0)
    params = {
        "embedding": jnp.ones((6, 4)),
        "w_head": jnp.ones((4, 6)),
        "final_norm": {"scale": jnp.ones(4)},
        "layers": {
            "attn": {"w_o": jnp.ones((2, 2, 3, 4))},
            "attn_norm": {"scale": jnp.ones((2, 4))},
            "ffn": {"w_router": jnp.ones((2, 4, 3))},
        },
    }
    updates, _ = first_update(cfg, params, jax.tree.map(jnp.zeros_like, params))  # zero grads
    new = flat(optax.apply_updates(params, updates))
    mask = flat(decay_mask(params))
    decayed = [k for k, decays in mask.items() if decays]
    assert decayed == ["layers/attn/w_o", "layers/ffn/w_router", "w_head"]
    for key, decays in mask.items():
        want = 1.0 - 0.1 * 0.1 if decays else 1.0  # p <- p - lr·wd·p
        np.testing.assert_allclose(new[key], want, rtol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_one_jitted_step_on_tiny_model(tiny_abstract, name):
    params = random_like(tiny_abstract)
    opt = make_optimizer(OptimConfig(name=name, warmup_steps=0), tiny_abstract, 100)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new, _ = step(params, jax.jit(opt.init)(params), random_like(tiny_abstract, seed=1))
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_steps_reduce_a_quadratic(name):
    shapes = {"attn": {"w_o": jnp.zeros((2, 4, 8))}, "w_head": jnp.zeros((8, 16)),
              "final_norm": {"scale": jnp.zeros(8)}}
    target = random_like(shapes, seed=3)
    params = jax.tree.map(jnp.zeros_like, target)
    cfg = OptimConfig(name=name, lr=0.05, warmup_steps=0, weight_decay=0.0)
    opt = make_optimizer(cfg, params, 30)

    def loss(params):
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(target))
        return sum(jnp.sum((p - t) ** 2) for p, t in pairs)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state, losses = jax.jit(opt.init)(params), []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------
# Engram: its tables are their own Adam group (lr × table_lr_multiplier, decay only if asked)

X, I, D, R, H = 12, 2, 8, 16, 4  # memory width K·H, streams, model width, table rows, row width


def engram_params(variant="v41"):
    names = {"v41": {"table": (R, H), "w_kv": (X, I + 1, D), "q_weight": (I, D), "k_weight": (I, D)},
             "paper": {"table": (R, H), "w_k": (X, I, D), "b_k": (I, D), "w_v": (X, D), "b_v": (D,),
                       "q_norm": (I, D), "k_norm": (I, D), "conv_norm": (I, D), "conv": (3, I, D)}}[variant]
    return {"layers_1": {"engram": {k: jnp.ones(s) for k, s in names.items()},
                         "attn": {"w_kv": jnp.ones((D, 6))}}, "w_head": jnp.ones((D, 5))}


def engram_cfg(multiplier=5.0, decay=False):
    return EngramConfig(layer_ids=(1,), num_embeddings=(R,), max_ngram_size=3, n_heads=2, head_dim=H,
                        compressed_vocab_size=50, table_lr_multiplier=multiplier, table_weight_decay=decay)


@pytest.mark.parametrize("variant", ["v41", "paper"])
def test_engram_groups(variant):
    """The tables form the `table` group; Engram's projections are Muon matrices with their own axes
    (its w_kv [X, I+1, D] is one [X, (I+1)·D] matrix, attention's w_kv [D, X'] stays [D, X'])."""
    params = engram_params(variant)
    groups = flat(param_groups(params))
    dims = flat(muon_dimension_numbers(params), is_leaf=lambda x: isinstance(x, Dims))
    mask = flat(decay_mask(params, engram_cfg()))
    assert groups["layers_1/engram/table"] == "table" and not mask["layers_1/engram/table"]
    assert flat(decay_mask(params, engram_cfg(decay=True)))["layers_1/engram/table"]
    assert groups["layers_1/attn/w_kv"] == "muon" and dims["layers_1/attn/w_kv"] == Dims((0,), (1,))
    muon = {"v41": {"w_kv": Dims((0,), (1, 2))}, "paper": {"w_k": Dims((0,), (1, 2)), "w_v": Dims((0,), (1,))}}
    for name, group in groups.items():
        leaf = name.rsplit("/", 1)[-1]
        if name.startswith("layers_1/engram/") and leaf != "table":
            want = "muon" if leaf in muon[variant] else "adamw"
            assert group == want, name
            assert mask[name] == (want == "muon"), name  # gains, biases and the depthwise conv: no decay
            if want == "muon":
                assert dims[name] == muon[variant][leaf], name


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_engram_table_lr_multiplier(name):
    """A table's first step is Adam's -lr·mult·g/(|g| + eps) (m̂ = g, v̂ = g²), exactly mult × its step
    at multiplier 1, under AdamW and under Muon (no orthogonalisation); the other leaves do not move
    with the multiplier."""
    cfg = OptimConfig(name=name, lr=0.01, warmup_steps=0, clip_norm=0.0, weight_decay=0.1)
    params = engram_params()
    grads = random_like(params, seed=5)

    def updates(multiplier):
        opt = make_optimizer(cfg, params, 10, engram=engram_cfg(multiplier))
        return flat(jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)[0])

    one, five = updates(1.0), updates(5.0)
    g = np.asarray(grads["layers_1"]["engram"]["table"])
    np.testing.assert_allclose(five["layers_1/engram/table"], -0.01 * 5.0 * g / (np.abs(g) + cfg.eps), rtol=1e-6)
    np.testing.assert_allclose(five["layers_1/engram/table"], 5.0 * one["layers_1/engram/table"], rtol=1e-6)
    for key in one:
        if key != "layers_1/engram/table":
            np.testing.assert_array_equal(five[key], one[key], err_msg=key)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_engram_table_weight_decay(name):
    """Zero gradients: a table keeps its values unless table_weight_decay (then p·(1 − lr·mult·wd))."""
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.1, warmup_steps=0)
    params = engram_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay, want in ((False, 1.0), (True, 1.0 - 0.1 * 3.0 * 0.1)):
        opt = make_optimizer(cfg, params, 10, engram=engram_cfg(3.0, decay))
        new = flat(optax.apply_updates(params, opt.update(zeros, opt.init(params), params)[0]))
        np.testing.assert_allclose(new["layers_1/engram/table"], want, rtol=1e-6, err_msg=str(decay))
        np.testing.assert_allclose(new["w_head"], 1.0 - 0.1 * 0.1, rtol=1e-6)  # the base decay, unchanged


def test_engram_tables_need_their_config():
    params = engram_params()
    with pytest.raises(ValueError, match="engram=cfg.model.engram"):
        make_optimizer(OptimConfig(), params, 10)
    frozen = jax.tree.map(lambda _: True, params)  # the frozen-parameter path passes it through
    make_optimizer(OptimConfig(), params, 10, trainable=frozen, engram=engram_cfg())
