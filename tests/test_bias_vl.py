"""V4.1's second selection bias `bias_vl` under the aux-loss-free rule: each MoE layer counts the
real tokens that selected with `bias` (outside media spans) and with `bias_vl` (inside) apart,
`update_biases` moves each bias from its own modality's counts at train.bias_update_rate, and a
batch without span tokens leaves `bias_vl` bit for bit.

The train-step tests run tiny_v41 cut to 3 layers (plus its 2 DSpark stages) reading audio spans, and
recount every layer's loads from the expert ids its forward sows (`intermediates`): the rule's
reference is b + float32(γ)·sign(mean c − c) in numpy float32 (the rule is float32 by definition, and
the means of these integer counts over 16 or 4 experts are exact), compared bit for bit.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import MoEConfig, load_config
from deepseek_jax.engram_hash import engram_layout, hash_rows
from deepseek_jax.layers.moe.balance import update_router_bias
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoE
from deepseek_jax.media import slots as S
from deepseek_jax.media.slots import media_from_batch
from deepseek_jax.models import router_bias_rows
from deepseek_jax.program import build_program
from deepseek_jax.sharding import make_mesh, rules
from deepseek_jax.train import _loss_terms, update_biases
from tests.utils import ROOT

# tiny_v41 at 3 layers (sliding window; a ratio-2 source with Engram before it; the ratio-1 source) and
# its 2 DSpark stages on all 3, E = 16 (A = 4), DSpark E' = 4 (A' = 2); audio at 8 kHz as the media
# (21 mel frames -> 6 audio tokens, an 8-position span); B = 8 rows divide the fsdp_ep mesh's batch
SMALL = [
    "model.vocab_size=512", "data.seq_len=32", "data.global_batch_size=8", "model.dim=64", "model.v4.window_size=8",
    "model.v4.index_topk=4", "model.shared_kv.candidate_topk_blocks=2", "model.engram.compressed_vocab_size=512",
    "model.n_layers=3", "model.compress_ratios=[0,2,1,0,0]", "model.shared_kv.kv_source_layers=[1,2]",
    "model.shared_kv.index_source_layers=[1,2]", "model.shared_kv.candidate_source_layer=2",
    "model.engram.layer_ids=[1]", "model.engram.num_embeddings=[8214]", "model.dspark.target_layers=[0,1,2]",
    "model.audio={audio_token_id: 511, sample_rate: 8000, n_fft: 200, hop_length: 80, n_mels: 16, fmin: 100.0, "
    "fmax: 4000.0, conv_channels: 32, conv_strides: [2, 2], max_seconds: 0.2}",
]  # fmt: skip
N_MEL_FRAMES = 21


def small_cfg(mesh: str = "single", *overrides: str):
    return load_config([ROOT / "configs/model/tiny_v41.yaml", ROOT / f"configs/mesh/{mesh}.yaml"],
                       [*SMALL, *overrides])


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.int32)


def np_rule(bias, counts, rate):
    """The aux-loss-free rule as V3 writes it, in numpy float32, over the last axis."""
    counts = np.asarray(counts, np.float64)
    sign = np.sign(counts.mean(-1, keepdims=True) - counts).astype(np.float32)
    return (np.asarray(bias, np.float32) + np.float32(rate) * sign).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The rule and the registry


def test_all_zero_counts_leave_the_bias_bit_for_bit():
    """sign(0) = 0: zero counts (no span token) and uniform counts change nothing, -0.0 included."""
    rng = np.random.default_rng(0)
    bias_LE = rng.uniform(-0.1, 0.1, (3, 16)).astype(np.float32)
    bias_LE[0, :3] = [0.0, -0.0, 1e-30]
    for counts_LE in (np.zeros((3, 16), np.int32), np.full((3, 16), 7, np.int32)):
        for rate in (1e-3, 0.0):
            got = update_router_bias(jnp.asarray(bias_LE), jnp.asarray(counts_LE), rate)
            np.testing.assert_array_equal(bits(got), bits(bias_LE))
    counts_LE = rng.integers(0, 40, (3, 16)).astype(np.int32)  # non-zero counts: V3's rule bit for bit
    np.testing.assert_array_equal(bits(update_router_bias(jnp.asarray(bias_LE), jnp.asarray(counts_LE), 1e-3)),
                                  bits(np_rule(bias_LE, counts_LE, 1e-3)))


def test_registry_lists_bias_vl_with_its_own_counts():
    """Every main block's bias of a vl_bias model has a bias_vl row on the same rows of `main_vl`; DSpark's
    stages (no span reaches them: counts_vl always zero) list only their bias."""
    cfg = small_cfg().model
    rows = router_bias_rows(cfg)
    text = [r for r in rows if r.path[-1] == "bias"]
    vl = [r for r in rows if r.path[-1] == "bias_vl"]
    assert [r.source for r in text] == ["main"] * 3 + ["dspark"] * 2
    assert [(r.path[:-1], r.source, r.rows) for r in vl] == [(r.path[:-1], "main_vl", r.rows) for r in text[:3]]
    no_vl = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, vl_bias=False))
    assert router_bias_rows(no_vl) == text


def test_update_biases_takes_each_bias_from_its_source():
    rng = np.random.default_rng(1)
    cfg = small_cfg().model
    rows = router_bias_rows(cfg)
    router = {}
    for r in rows:  # stacked [1, E] main biases, [E'] per DSpark stage
        E = cfg.moe.n_routed_experts if r.source.startswith("main") else cfg.dspark.n_routed_experts
        node = router
        for key in r.path[:-1]:
            node = node.setdefault(key, {})
        node[r.path[-1]] = rng.uniform(-0.1, 0.1, (1, E) if isinstance(r.rows, tuple) else (E,)).astype(np.float32)
    counts = {"main": rng.integers(0, 50, (3, 16)), "main_vl": rng.integers(0, 50, (3, 16)),
              "dspark": rng.integers(0, 50, (2, 4)), "dspark_vl": np.zeros((2, 4), np.int32)}
    new = update_biases(router, {k: jnp.asarray(v, jnp.int32) for k, v in counts.items()}, 1e-3, rows)
    for r in rows:
        old = router
        got = new
        for key in r.path:
            old, got = old[key], got[key]
        want = np_rule(old, counts[r.source][np.asarray(r.rows)], 1e-3)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=str(r.path))


# ----------------------------------------------------------------------------------------------
# The layer's counts


MOE = MoEConfig(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=12, impl="dense", vl_bias=True)
D = 16


def moe_counts(cfg: MoEConfig, span_BT, hash_routing=False):
    """(MoEAux, the sown experts [M, A]) of one MoE layer on random inputs with random bias / bias_vl."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, D)).astype(np.float32)
    mask = np.ones((2, 16), bool)
    mask[1, 12:] = False  # padding
    tokens = rng.integers(0, 32, (2, 16)).astype(np.int32)
    layer = MoE(cfg, D, jnp.float32, hash_routing=hash_routing, vocab_size=32)
    variables = nn.unbox(layer.init(jax.random.key(0), x, mask, tokens, span_BT))
    if not hash_routing:
        variables[ROUTER_COLLECTION] = {k: rng.uniform(-0.5, 0.5, 8).astype(np.float32)
                                        for k in variables[ROUTER_COLLECTION]}
    (_, aux), inter = layer.apply(variables, x, mask, tokens, span_BT, mutable=["intermediates"])
    (experts_MA,) = inter["intermediates"]["experts_MA"]
    return aux, np.asarray(experts_MA), mask.reshape(-1)


def test_moe_counts_split_by_span():
    """counts = real tokens outside spans, counts_vl = real tokens inside (recounted from the sown ids);
    without span_BT, without bias_vl or with hash routing every real token is in counts (as before)."""
    span = np.zeros((2, 16), bool)
    span[0, 3:9] = span[1, 10:14] = True  # the second span runs into the padding (not counted)
    E = MOE.n_routed_experts
    aux, ex, real = moe_counts(MOE, jnp.asarray(span))
    flat = span.reshape(-1)
    np.testing.assert_array_equal(aux.counts, np.bincount(ex[real & ~flat].ravel(), minlength=E))
    np.testing.assert_array_equal(aux.counts_vl, np.bincount(ex[real & flat].ravel(), minlength=E))
    assert int(aux.counts_vl.sum()) == 8 * 2
    for cfg, span_BT, hashed in ((MOE, None, False), (dataclasses.replace(MOE, vl_bias=False), span, False),
                                 (MOE, span, True)):
        aux, ex, real = moe_counts(cfg, None if span_BT is None else jnp.asarray(span_BT), hashed)
        np.testing.assert_array_equal(aux.counts, np.bincount(ex[real].ravel(), minlength=E))
        np.testing.assert_array_equal(aux.counts_vl, np.zeros(E, np.int32))


# ----------------------------------------------------------------------------------------------
# One train step


def make_batch(cfg, media: bool) -> dict:
    """B rows of T: random text, each row but the last with one audio span (at a row-dependent start),
    odd rows ending in 5 padding positions; Engram rows hashed with the spans dead (as the pipeline)."""
    B, T, a = cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.audio
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, cfg.model.vocab_size - 3, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1::2, T - 5:] = 0
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": seg}
    slots = np.full((B, T), S.TEXT, np.int32)
    if media:
        n = a.n_tokens(N_MEL_FRAMES)
        rows = np.zeros((B, T), np.int32)
        for b in range(B - 1):
            s = 2 + 2 * b
            slots[b, s], slots[b, s + 1:s + 1 + n], slots[b, s + 1 + n] = S.AUDIO_START, S.AUDIO, S.AUDIO_END
            rows[b, s + 1:s + 1 + n] = np.arange(n)
            tokens[b, s:s + n + 2] = a.audio_token_id
        mel_len = np.full((B, 1), N_MEL_FRAMES, np.int32)
        mel_len[B - 1] = 0
        batch.update(media_slots=slots, media_rows=rows, mel_len=mel_len,
                     mel=rng.standard_normal((B, 1, N_MEL_FRAMES, a.n_mels)).astype(np.float32))
    nxt_text = np.concatenate([(slots[:, 1:] == S.TEXT) & (seg[:, 1:] > 0), np.zeros((B, 1), bool)], axis=1)
    batch["loss_mask"] = (nxt_text & (seg > 0)).astype(np.float32)
    batch["engram_rows"] = hash_rows(engram_layout(cfg.model.engram), np.arange(cfg.model.vocab_size), tokens, seg,
                                     slots >= 0)
    return batch


@pytest.fixture(scope="module")
def setup():
    """The program, a state with random `bias` and `bias_vl` (±0.1), and per batch kind (media, text):
    the state after one train step, its metrics and each MoE's sown expert ids in the same state."""
    cfg = small_cfg()
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    state = p.init_state()
    rng = np.random.default_rng(4)
    state = state.replace(router=jax.tree.map(lambda b: rng.uniform(-0.1, 0.1, b.shape).astype(np.float32),
                                              jax.device_get(state.router)))
    step = jax.jit(p.train_step)

    @jax.jit
    def experts(params, router, batch):  # as _loss_terms calls the model (row positions, media)
        _, inter = p.model.apply({"params": params, "router": router}, batch["tokens"], None, batch["segment_ids"],
                                 return_logits=False, engram_rows=batch["engram_rows"],
                                 media=media_from_batch(batch), mutable=["intermediates"])
        return inter["intermediates"]

    runs = {}
    for kind in ("media", "text"):
        batch = make_batch(cfg, kind == "media")
        after, metrics = step(state, batch)
        runs[kind] = (batch, jax.device_get(after), jax.device_get(metrics),
                      jax.device_get(experts(state.params, state.router, batch)))
    return cfg, p, jax.device_get(state), runs


def recount(cfg, row, inter, batch) -> np.ndarray:
    """The loads [R, E] (or [E]) of one bias row, from the sown expert ids: `bias` rows count real tokens
    outside spans (all real tokens of a text batch, and every draft token of DSpark, which no span
    reaches), `bias_vl` rows real tokens inside."""
    node = inter
    for key in row.path[:-1]:
        node = node[key]
    (ex,) = node["experts_MA"]
    ex = np.asarray(ex)
    real = batch["segment_ids"] > 0
    span = batch.get("media_slots", np.full(real.shape, -1)) >= 0
    if row.source.startswith("dspark"):  # every draft token of position p is real where p is
        real, span = np.repeat(real, cfg.model.dspark.block_size, 1), np.zeros(1, bool)
    keep = (real & span if row.path[-1] == "bias_vl" else real & ~span).reshape(-1)
    E = (cfg.model.moe if row.source.startswith("main") else cfg.model.dspark).n_routed_experts
    count = lambda e: np.bincount(e[keep].ravel(), minlength=E)  # noqa: E731
    return np.stack([count(e) for e in ex]) if isinstance(row.rows, tuple) else count(ex)


def get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.slow
def test_media_step_moves_each_bias_by_its_modality(setup):
    """One train step on a batch with audio spans: every main layer's bias_vl moves by
    γ·sign(mean_vl − load_vl) of its span tokens' recounted loads, bias by the non-span tokens' loads
    only (which differ in sign from all tokens' somewhere); DSpark's stages (no span reaches them)
    keep bias_vl bit for bit."""
    cfg, _, before, runs = setup
    batch, after, metrics, inter = runs["media"]
    assert int(metrics["skipped"]) == 0
    rate = cfg.train.bias_update_rate
    assert rate == 1e-3
    split_matters, flips = False, []
    for row in router_bias_rows(cfg.model):
        old, new, load = get(before.router, row.path), get(after.router, row.path), recount(cfg, row, inter, batch)
        np.testing.assert_array_equal(bits(new), bits(np_rule(old, load, rate)), err_msg=str(row))
        if row.source == "main_vl":
            assert load.sum() == 7 * 8 * cfg.model.moe.n_activated_experts  # 7 spans of 8 real tokens
            assert (new != old).any()
        if row.source == "main":
            both = load + recount(cfg, row._replace(path=(*row.path[:-1], "bias_vl")), inter, batch)
            flips.append(int((np.sign(both.mean(-1, keepdims=True) - both)
                              != np.sign(load.mean(-1, keepdims=True) - load)).sum()))
            split_matters |= flips[-1] > 0
    for k in range(cfg.model.num_nextn_predict_layers):  # DSpark's bias_vl: listed nowhere, never moved
        path = ("dspark", f"stage_{k}", "ffn", "bias_vl")
        np.testing.assert_array_equal(bits(get(after.router, path)), bits(get(before.router, path)))
    print(f"\nmedia step: experts per main layer whose `bias` step differs from the all-token rule: {flips}; "
          f"bias_vl range [{metrics['bias_vl_min']:.4f}, {metrics['bias_vl_max']:.4f}]")
    assert split_matters, "the batch never tells the split rule from the rule on all tokens"
    assert metrics["bias_vl_min"] < metrics["bias_vl_max"] and metrics["bias_min"] < metrics["bias_max"]


@pytest.mark.slow
def test_text_step_moves_bias_as_before_and_keeps_bias_vl(setup):
    """A text-only batch: bias moves by the old rule on all real tokens, bias_vl stays bit for bit."""
    cfg, _, before, runs = setup
    batch, after, metrics, inter = runs["text"]
    assert int(metrics["skipped"]) == 0 and "media_slots" not in batch
    for row in router_bias_rows(cfg.model):
        old, new = get(before.router, row.path), get(after.router, row.path)
        if row.path[-1] == "bias_vl":
            np.testing.assert_array_equal(bits(new), bits(old), err_msg=str(row))
        else:
            np.testing.assert_array_equal(bits(new), bits(np_rule(old, recount(cfg, row, inter, batch), 1e-3)),
                                          err_msg=str(row))


@pytest.mark.slow
@pytest.mark.multidevice
def test_counts_are_global_sums_on_an_expert_parallel_mesh(setup):
    """fsdp_ep (8 devices: experts over 4, the batch over all 8): counts and counts_vl of the sharded
    forward equal the single-device recount of the same state and batch."""
    cfg, _, before, runs = setup
    batch, _, _, inter = runs["media"]
    mcfg = small_cfg("fsdp_ep")
    p = build_program(mcfg, make_mesh(mcfg.mesh), rules(mcfg.mesh))
    with p.activate():
        params = jax.device_put(before.params, p.state_shardings.params)
        router = jax.device_put(before.router, p.state_shardings.router)
        sharded = {k: jax.device_put(v, p.batch_sharding) for k, v in batch.items()}
        _, counts = jax.jit(lambda prm, rtr, b: _loss_terms(prm, rtr, b, p.model, mcfg))(params, router, sharded)
    counts = jax.device_get(counts)
    for row in router_bias_rows(cfg.model):
        got = counts[row.source][np.asarray(row.rows)]
        np.testing.assert_array_equal(got, recount(cfg, row, inter, batch), err_msg=str(row))
