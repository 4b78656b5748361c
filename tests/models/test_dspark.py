"""DSpark (models/dspark.py): one stage's draft attention and the Markov / confidence heads against a
float64 numpy statement; training (every position at once) equals decode-time drafting; speculative
decoding returns exactly greedy decoding's tokens; the training loss reaches every DSpark parameter.

The model-level tests use configs/model/tiny_v41.yaml at vocab 256 (Engram on, its compressed vocabulary a
fold of the 256 ids) with random variables filled from the declared shapes (no init compile)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import generate as gen
from deepseek_jax import losses
from deepseek_jax.config import load_config
from deepseek_jax.engram_hash import engram_layout, hash_rows
from deepseek_jax.layers.rope import yarn_inv_freq
from deepseek_jax.models import build_model, router_bias_rows
from deepseek_jax.models.common import layer_rope
from deepseek_jax.models.dspark import STAGE_KIND, DSpark, DSparkAttention, TrainWindow, init_draft_state
from deepseek_jax.train import loss_fn
from tests.utils import CONFIGS, TOL, assert_close

V41 = [CONFIGS / "model/tiny_v41.yaml", CONFIGS / "mesh/single.yaml"]
OVERRIDES = ["model.vocab_size=256", "model.engram.compressed_vocab_size=128", "data.seq_len=16",
             "data.global_batch_size=2"]
CMAP = np.arange(256) % 128  # the Engram fold of the 256 ids (case variants share a compressed id)


def small_dspark_cfg(qat: bool = True):
    """tiny_v41's DSpark at vocab 256 with a window of 4 (T = 10 wraps it)."""
    cfg = load_config(V41, OVERRIDES).model
    return dataclasses.replace(cfg, v4=dataclasses.replace(cfg.v4, window_size=4), engram=None,
                               shared_kv=dataclasses.replace(cfg.shared_kv, qat=qat))


def random_inputs(cfg, B=2, T=10, seed=0):
    """tokens [B, T], captures [B, T, n·D], embedding [V, D], head [D, V] (float32)."""
    k = jax.random.split(jax.random.key(seed), 4)
    C = len(cfg.dspark.target_layers) * cfg.dim
    return (jax.random.randint(k[0], (B, T), 0, cfg.vocab_size), jax.random.normal(k[1], (B, T, C)),
            jax.random.normal(k[2], (cfg.vocab_size, cfg.dim)),
            jax.random.normal(k[3], (cfg.dim, cfg.vocab_size)) * cfg.dim**-0.5)


def perturb(variables, seed=1, scale=0.3):
    """Norm scales, sinks and biases off their init (1, 0, 0), so each one's role is checked."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        name = jax.tree_util.keystr(path)
        if any(s in name for s in ("scale", "sink", "bias", "base")):
            return x + scale * rng.standard_normal(x.shape).astype(np.float32)
        return x
    return jax.tree_util.tree_map_with_path(f, nn.unbox(variables))


# ----------------------------------------------------------------------------------------------
# (a) numpy statement: one stage's draft attention, the Markov and confidence heads


def np_rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def np_rope(x, pos, inv_freq):
    """Interleaved RoPE on the last R dims of x [..., X] at integer positions pos (x's leading shape)."""
    R = 2 * len(inv_freq)
    ang = np.asarray(pos, np.float64)[..., None] * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., -R::2], x[..., -R + 1::2]
    out = x.copy()
    out[..., -R::2], out[..., -R + 1::2] = a * c - b * s, b * c + a * s
    return out


def np_draft_attention(p, x_TZD, main_TD, w, inv_freq, eps):
    """Group p's Z queries (positions p+1 …) over main_x kv at positions max(0, p−w+1) … p and all Z
    block kv; sink in the denominator; inverse RoPE; grouped output. float64, one row."""
    T, Z, D = x_TZD.shape
    q = lambda x: np.einsum("ZQ,QNX->ZNX", np_rms(x @ p["w_dq"], p["q_norm"]["scale"], eps), p["w_uq"])  # noqa: E731
    kv = lambda x: np_rms(x @ p["w_kv"], p["kv_norm"]["scale"], eps)  # noqa: E731
    outs = []
    for t in range(T):
        pos_Z = t + 1 + np.arange(Z, dtype=np.float64)
        q_ZNX = np.stack([np_rope(qz, np.full(qz.shape[0], pz), inv_freq) for qz, pz in zip(q(x_TZD[t]), pos_Z)])
        ctx = np.arange(max(0, t - w + 1), t + 1)
        k_ctx = np.stack([np_rope(kv(main_TD[j]), np.float64(j), inv_freq) for j in ctx])
        k_blk = np.stack([np_rope(kv(x_TZD[t, z]), pos_Z[z], inv_freq) for z in range(Z)])
        k_UX = np.concatenate([k_ctx, k_blk])
        logits_ZNU = np.einsum("ZNX,UX->ZNU", q_ZNX, k_UX) / np.sqrt(k_UX.shape[-1])
        m = np.maximum(logits_ZNU.max(-1, keepdims=True), p["sink"][None, :, None])
        e = np.exp(logits_ZNU - m)
        probs = e / (e.sum(-1, keepdims=True) + np.exp(p["sink"][None, :, None] - m))
        o_ZNX = np.einsum("ZNU,UX->ZNX", probs, k_UX)
        o_ZNX = np.stack([np_rope(oz, np.full(oz.shape[0], -pz), inv_freq) for oz, pz in zip(o_ZNX, pos_Z)])
        W, P = p["w_oa"].shape[:2]
        u_ZWY = np.einsum("ZWPX,WPXY->ZWY", o_ZNX.reshape(Z, W, P, -1), p["w_oa"])
        outs.append(np.einsum("ZWY,WYD->ZD", u_ZWY, p["w_ob"]))
    return np.stack(outs)


def test_draft_attention_matches_numpy():
    cfg = small_dspark_cfg(qat=False)  # the FP8 window fake-quant has no float64 statement here
    B, T, Z, D = 2, 10, cfg.dspark.block_size, cfg.dim
    attn = DSparkAttention(cfg.v4, layer_rope(cfg, STAGE_KIND), 0, D, cfg.norm_eps, jnp.float32, q_head_norm=False,
                           role="swa", shared_cfg=cfg.shared_kv, block_size=Z)
    k = jax.random.split(jax.random.key(3), 2)
    x_BMD, main_BTD = jax.random.normal(k[0], (B, T * Z, D)), jax.random.normal(k[1], (B, T, D))
    positions_BM = jnp.broadcast_to((jnp.arange(T)[:, None] + 1 + jnp.arange(Z)).reshape(-1), (B, T * Z))
    v = perturb(jax.jit(attn.init)(jax.random.key(0), x_BMD, positions_BM, TrainWindow(main_BTD)), scale=1.0)
    with jax.default_matmul_precision("highest"):
        got, _ = attn.apply(v, x_BMD, positions_BM, TrainWindow(main_BTD))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    inv_freq = np.asarray(yarn_inv_freq(cfg.v4.rope_head_dim, cfg.rope.rope_theta), np.float64)
    for b in range(B):
        want = np_draft_attention(p64, np.asarray(x_BMD[b], np.float64).reshape(T, Z, D),
                                  np.asarray(main_BTD[b], np.float64), cfg.v4.window_size, inv_freq, cfg.norm_eps)
        assert_close(np.asarray(got[b]).reshape(T, Z, D), want, **TOL["layer_f32"], what="draft attention")


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def dspark_apply(cfg, variables, *args, method=None):
    """(DSpark's output, the collapsed hidden h entering its `norm`) of one apply."""
    seen = {}

    def grab(f, args_, kwargs, context):
        if context.module.name == "norm" and context.method_name == "__call__":
            seen["h"] = args_[0]
        return f(*args_, **kwargs)

    with nn.intercept_methods(grab), jax.default_matmul_precision("highest"):
        out = DSpark(cfg).apply(variables, *args, method=method)
    return out, seen["h"]


@pytest.fixture(scope="module")
def drafter():
    """(cfg, variables, (tokens, captures, embedding, head), training output, its h) at T = 10, w = 4."""
    cfg = small_dspark_cfg()
    inputs = random_inputs(cfg)
    v = perturb(jax.jit(DSpark(cfg).init)(jax.random.key(0), *inputs))
    out, h = dspark_apply(cfg, v, *inputs)
    return cfg, v, inputs, out, np.asarray(h, np.float64)


def markov_inputs(tokens_BT, Z: int):
    """t_{p+1+z} at [b, p, z] (0 past the row end): the teacher-forced Markov inputs."""
    return jnp.stack([jnp.pad(tokens_BT[:, 1 + z:], ((0, 0), (0, 1 + z))) for z in range(Z)], -1)


def test_markov_and_confidence_heads_match_numpy(drafter):
    cfg, v, (tokens, caps, emb, w_head), out, h = drafter
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    T, Z = tokens.shape[1], cfg.dspark.block_size
    e_BTZY = p["markov_embed"][np.asarray(markov_inputs(tokens, Z))]
    hidden = np_rms(h, p["norm"]["scale"], cfg.norm_eps)
    want_logits = hidden @ np.asarray(w_head, np.float64) + e_BTZY @ p["markov_head"]
    want_conf = np.concatenate([h, e_BTZY], -1) @ p["confidence"][:, 0]
    assert_close(out.logits, want_logits, **TOL["layer_f32"], what="draft logits")
    assert_close(out.confidence, want_conf, **TOL["layer_f32"], what="confidence")
    assert out.logits.shape == (2, T, Z, cfg.vocab_size)
    assert out.routing.counts.shape == (2, cfg.dspark.n_routed_experts)

    # greedy drafting after position 3: out_0 = y, out_{z+1} = argmax(norm(h_z) W_head + E_M[out_z] W_M)
    y = tokens[:, 4]
    (dout, _), h1 = dspark_apply(cfg, v, y, caps, init_draft_state(cfg, 2), jnp.int32(4), emb, w_head, None,
                                 method="draft")  # captures past the first 4 rows are padding
    h1 = np.asarray(h1, np.float64)
    base_BZV = np_rms(h1[:, 0], p["norm"]["scale"], cfg.norm_eps) @ np.asarray(w_head, np.float64)
    out_B, drafts, conf = np.asarray(y), [], []
    for z in range(Z):
        e_BY = p["markov_embed"][out_B]
        logits_BV = base_BZV[:, z] + e_BY @ p["markov_head"]
        top2 = np.sort(logits_BV, -1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-3).all()  # argmax decisions are compared exactly
        conf.append(np.concatenate([h1[:, 0, z], e_BY], -1) @ p["confidence"][:, 0])
        out_B = logits_BV.argmax(-1)
        drafts.append(out_B)
    np.testing.assert_array_equal(np.asarray(dout.tokens[:, 0]), np.stack(drafts, 1))
    assert_close(dout.confidence[:, 0], np.stack(conf, 1), **TOL["layer_f32"], what="draft confidence")


# ----------------------------------------------------------------------------------------------
# (b) training on every position = decoding from the same context


def test_training_equals_decode_drafting(drafter):
    """Group p of the training pass = a draft after writing captures 0 … p into the windows (at once, or
    as a prefill then a padded step), teacher-forced; the window (w = 4) wraps at T = 10."""
    cfg, v, (tokens, caps, emb, w_head), train, _ = drafter
    Z, C = cfg.dspark.block_size, caps.shape[-1]
    markov_BTZ = markov_inputs(tokens, Z)
    empty = init_draft_state(cfg, 2)
    for p in (1, 5, 8):
        # all rows at once (rows ≥ p + 1 are padding)
        (out, state), _ = dspark_apply(cfg, v, tokens[:, p + 1], caps, empty, jnp.int32(p + 1), emb, w_head,
                                       markov_BTZ[:, p], method="draft")
        assert int(state.position) == p + 1
        assert_close(out.logits[:, 0], train.logits[:, p], **TOL["layer_f32"], what=f"logits at p={p}")
        assert_close(out.confidence[:, 0], train.confidence[:, p], **TOL["layer_f32"], what=f"confidence at p={p}")
        # rows 0 … p−2, then rows p−1, p padded to Z + 1 rows (speculative decoding's step shape)
        (_, half), _ = dspark_apply(cfg, v, tokens[:, p + 1], caps, empty, jnp.int32(p - 1), emb, w_head,
                                    markov_BTZ[:, p], method="draft")
        rows = jnp.concatenate([caps[:, p - 1 : p + 1], jnp.zeros((2, Z - 1, C))], axis=1)
        (out2, _), _ = dspark_apply(cfg, v, tokens[:, p + 1], rows, half, jnp.int32(2), emb, w_head, markov_BTZ[:, p],
                                    method="draft")
        assert_close(out2.logits[:, 0], train.logits[:, p], **TOL["layer_f32"], what=f"stepwise logits at p={p}")


# ----------------------------------------------------------------------------------------------
# (c) speculative decoding on tiny_v41, (d) the training loss


def random_variables(model, seed=0):
    """Variables of the declared shapes (no init compile): norm scales 1, mHC scales 0.01, biases and
    sinks 0, embeddings N(0, 1), other weights N(0, 1/fan-in), fan-in the first axis that is not a
    stacking one (layers, experts), or P·X of W_oa, W·Y of W_ob, I·D of the mHC φ."""
    tokens, e = jnp.zeros((1, 4), jnp.int32), model.cfg.engram
    rows = None if e is None else jnp.asarray(hash_rows(engram_layout(e), CMAP, np.zeros((1, 4), np.int64)))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, engram_rows=rows))
    rng, fan_in_axes = np.random.default_rng(seed), {"w_oa": slice(1, 3), "w_ob": slice(0, 2), "fn": slice(0, 2)}

    def fill(path, leaf):
        name, shape = "/".join(str(getattr(k, "key", k)) for k in path), leaf.value.shape
        last = name.rsplit("/", 1)[-1]
        if last in ("scale", "bias", "bias_vl", "base", "sink"):
            value = {"scale": 0.01 if "_hc/" in name else 1.0}.get(last, 0.0)
            return np.full(shape, value, np.float32)
        dims = [n for n, a in zip(shape, leaf.names) if a not in ("layers", "experts")]
        fan_in = int(np.prod(dims[fan_in_axes.get(last, slice(0, 1))]))
        std = 1.0 if last in ("embedding", "markov_embed") else fan_in**-0.5
        return (std * rng.standard_normal(shape)).astype(np.float32)

    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree_util.tree_map_with_path(fill, {c: boxed[c] for c in ("params", "router")}, is_leaf=is_boxed)


@pytest.fixture(scope="module")
def tiny_v41():
    cfg = load_config(V41, OVERRIDES)
    model = build_model(cfg.model)
    return cfg, model, random_variables(model)


PROMPTS = [[17, 3, 250, 9, 41, 41, 7, 120, 66], [5, 88, 200, 13, 13, 99, 1, 64, 31]]
N_NEW = 25  # ≥ 24, and 1 + 6·(Z + 1): a drafter that is always right ends exactly at the budget


@pytest.fixture(scope="module")
def greedy(tiny_v41):
    _, model, v = tiny_v41
    return gen.generate(model, v, PROMPTS, N_NEW, eos_id=-1, engram_map=CMAP)


def test_speculative_decoding_returns_the_greedy_tokens(tiny_v41, greedy):
    _, model, v = tiny_v41
    stats = {}
    got = gen.generate(model, v, PROMPTS, N_NEW, eos_id=-1, engram_map=CMAP, speculative=True, stats=stats)
    assert got == greedy and all(len(g) == N_NEW for g in got)
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["steps"] >= 1
    assert stats["drafted"] == stats["steps"] * model.cfg.dspark.block_size


def oracle_drafter(greedy, P, wrong_from: int | None = None):
    """A drafter that returns greedy decoding's continuation (wrong from slot `wrong_from` on)."""
    real = gen._draft
    oracle = np.asarray(greedy)

    def draft(cfg, variables, y_B, rows, state, n_new):
        _, new_state = real(cfg, variables, y_B, rows, state, n_new)
        pos = int(state.position) + int(n_new)  # y's position; drafts are for pos + 1 … pos + Z
        idx = np.minimum(pos + 1 - P + np.arange(cfg.dspark.block_size), oracle.shape[1] - 1)
        drafts = oracle[:, idx].copy()
        if wrong_from is not None:
            drafts[:, wrong_from:] = (drafts[:, wrong_from:] + 1) % cfg.vocab_size
        return jnp.asarray(drafts, jnp.int32), new_state
    return draft


def test_a_drafter_that_is_right_is_accepted_every_time(tiny_v41, greedy, monkeypatch):
    _, model, v = tiny_v41
    monkeypatch.setattr(gen, "_draft", oracle_drafter(greedy, len(PROMPTS[0])))
    got, stats = gen.speculative_generate(model, v, PROMPTS, N_NEW, eos_id=-1, engram_map=CMAP)
    Z = model.cfg.dspark.block_size
    assert got == greedy
    assert stats["acceptance_rate"] == 1.0 and stats["accepted_per_step"] == Z
    assert stats["steps"] == (N_NEW - 1) // (Z + 1)


@pytest.mark.slow  # ~5 s; greedy equality stays in the inner loop
def test_a_partly_right_drafter_commits_its_prefix(tiny_v41, greedy, monkeypatch):
    """d_1 right, d_2 wrong: each step commits [y, d_1] from the cache verification started from."""
    _, model, v = tiny_v41
    monkeypatch.setattr(gen, "_draft", oracle_drafter(greedy, len(PROMPTS[0]), wrong_from=1))
    got, stats = gen.speculative_generate(model, v, PROMPTS, N_NEW, eos_id=-1, engram_map=CMAP)
    assert got == greedy and stats["accepted_per_step"] == 1.0


def test_dspark_loss_matches_its_definition():
    """losses.dspark_losses in chunks of 7 = numpy: slot z of position p is scored against t_{p+2+z} only
    when every hop t_p … t_{p+2+z} stays in the row and in one document (loss_mask)."""
    B, T, Z, D, Y, V = 2, 9, 3, 8, 4, 16
    rng = np.random.default_rng(0)
    h, m, conf = rng.standard_normal((B, T, Z, D)), rng.standard_normal((B, T, Z, Y)), rng.standard_normal((B, T, Z))
    w_head, w_markov = rng.standard_normal((D, V)), rng.standard_normal((Y, V))
    tokens = rng.integers(0, V, (B, T))
    loss_mask = np.ones((B, T), bool)
    loss_mask[1, 4] = False  # row 1: a document ends at position 4
    f32 = lambda *a: [jnp.asarray(x, jnp.float32) for x in a]  # noqa: E731
    with jax.default_matmul_precision("highest"):
        ce, bce = losses.dspark_losses(*f32(h, m, conf, w_head, w_markov), jnp.asarray(tokens), jnp.asarray(loss_mask),
                                       chunk=7)
    logits = h @ w_head + m @ w_markov
    bce_sum, n_all, per_slot = 0.0, 0, []
    for z in range(Z):
        s, n = 0.0, 0
        for b in range(B):
            for p in range(T - 2 - z):
                if not loss_mask[b, p : p + 2 + z].all():
                    continue
                lz, y = logits[b, p, z], tokens[b, p + 2 + z]
                s, n = s + np.log(np.exp(lz - lz.max()).sum()) + lz.max() - lz[y], n + 1
                c, hit = conf[b, p, z], float(lz.argmax() == y)
                bce_sum, n_all = bce_sum + np.log1p(np.exp(c)) - hit * c, n_all + 1
        per_slot.append(s / n)
    assert_close(ce, np.mean(per_slot), **TOL["layer_f32"], what="draft cross-entropy")
    assert_close(bce, bce_sum / n_all, **TOL["layer_f32"], what="confidence BCE")


def test_training_loss_reaches_every_dspark_parameter():
    """On tiny_v41 cut to 2 layers (compile time: a window layer and a ratio-1 kv source), Engram off;
    DSpark reads both."""
    cfg = load_config(V41, OVERRIDES)
    m = cfg.model
    shared = dataclasses.replace(m.shared_kv, kv_source_layers=(1,), index_source_layers=(1,),
                                 candidate_source_layer=-1)
    m = dataclasses.replace(m, n_layers=2, compress_ratios=(0, 1, 0, 0), engram=None, shared_kv=shared,
                            dspark=dataclasses.replace(m.dspark, target_layers=(0, 1)))
    cfg = dataclasses.replace(cfg, model=m)
    model = build_model(m)
    v = random_variables(model)
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T)).astype(np.int32)
    segs = np.ones((B, T), np.int32)
    segs[1, 9:] = 2  # two documents in row 1: no draft target crosses the boundary
    loss_mask = np.ones((B, T), bool)
    loss_mask[1, 8] = False
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "segment_ids": segs, "loss_mask": loss_mask}
    grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, v["router"], batch, model, cfg), has_aux=True))
    (total, (terms, counts)), grads = grad(v["params"])
    assert np.isfinite(total) and terms["mtp"] > 0 and terms["confidence"] > 0
    d, K = cfg.model.dspark, cfg.model.num_nextn_predict_layers
    assert counts["dspark"].shape == (K, d.n_routed_experts)
    assert int(counts["dspark"].sum()) == K * B * T * d.block_size * d.n_activated_experts  # every draft token
    for path, g in jax.tree_util.tree_leaves_with_path(grads["dspark"]):
        assert np.isfinite(g).all() and np.abs(g).max() > 0, f"no gradient at dspark{jax.tree_util.keystr(path)}"
    rows = [r for r in router_bias_rows(cfg.model) if r.source == "dspark"]
    assert [r.path for r in rows] == [("dspark", f"stage_{k}", "ffn", "bias") for k in range(K)]
