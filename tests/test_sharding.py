"""Sharding on 8 fake CPU devices: every mesh file gives the single-device loss, gradients and
balance statistics (layout invariance; the tiny V3.2's DSA blocks on two mesh files that split
its indexer's heads, weights and batch; the tiny V4 with every block kind, the tiny V4.1, and a
tiny V4.1 reading images, a video and audio, each on fsdp_ep and fsdp_tp); parameter partition specs
of the tiny models (the multimodal one's media front-ends included) match the golden files; V4.1-Flash's
media parameters shard sensibly on every mesh file; the compiled fsdp_ep step holds the dispatch
collectives and never gathers the experts over the expert axis; the mesh files are complete; only
sharding.py names mesh axes."""

import ast
import base64
import functools
import importlib.util
import io
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from PIL import Image

from deepseek_jax.axes import LOGICAL_AXES
from deepseek_jax.config import MESH_AXES, ConfigError, load_config
from deepseek_jax.engram_hash import engram_layout, hash_rows
from deepseek_jax.media import slots as S
from deepseek_jax.media.encode import MediaBudget, RecordEncoder, collate_row
from deepseek_jax.models import build_model
from deepseek_jax.models.media import MediaEmbed, init_media
from deepseek_jax.plan.analytic import spec_axes
from deepseek_jax.sharding import (
    abstract_mesh,
    activate,
    batch_sharding,
    logical_shardings,
    make_mesh,
    rules,
)
from deepseek_jax.tokenizer import Tokenizer
from deepseek_jax.train import loss_fn
from tests.utils import ROOT, TOL, assert_close, assert_close_to_scale, wav_bytes, whitespace_words

pytestmark = pytest.mark.multidevice
MESHES = sorted(p.stem for p in (ROOT / "configs" / "mesh").glob("*.yaml"))
# the inner loop (`pytest -m "not slow"`) keeps three meshes that between them split every axis
# but `context` (fsdp_ep, dp_ep, fsdp_tp); the others are `slow` (~2 s each warm, ~5 s cold)
INNER_LOOP_MESHES = ("fsdp_ep", "dp_ep", "fsdp_tp")


def slow_unless(values, keep) -> list:
    """`values` as parametrize arguments, those not in `keep` marked slow."""
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]


EP_MESHES = ("fsdp_ep", "ep_tp", "dp_ep", "experts_on_fsdp")
# the tiny model, two layers (one dense, one MoE) + MTP; E=16, D=128, F=96 are distinct sizes
SMALL = ["model.n_layers=2", "model.vocab_size=512", "data.seq_len=32", "data.global_batch_size=8"]
# the tiny V3.2 as two dense DSA blocks (its MoE is V3's, covered above; no MoE and no MTP keep the
# compiles short): T = 32 > index_topk = 8, so the selection is sparse. fsdp_tp splits the
# indexer's heads over `tensor` and its weights over `fsdp`; ep_tp splits the batch over `expert`
V32_SMALL = [*SMALL, "model.n_dense_layers=2", "model.num_nextn_predict_layers=0", "model.index.index_topk=8"]
V32_MESHES = ("fsdp_tp", "ep_tp")
# the tiny V4 at its smallest with every path live: layer 0 CSA (ratio 4: T/4 = 8 entries > index_topk
# = 4) routed by the hash table, layer 1 HCA (ratio 8) with learned routing, the MTP block sliding-window
# only (window 8 < T = 32), all on 4 mHC streams. Sizes are distinct (D=64, Q=48, X=32, Y=40, F=24,
# E=8) and divide the fsdp / tensor / expert splits. fsdp_ep runs the expert-parallel dispatch (E
# over expert, D over fsdp); fsdp_tp splits the query, output-group, sink and indexer heads over tensor
V4_SMALL = [
    "model.vocab_size=512", "data.seq_len=32", "data.global_batch_size=8", "model.dim=64", "model.n_layers=2",
    "model.compress_ratios=[4,8,0]", "model.v4.head_dim=32", "model.v4.rope_head_dim=8", "model.v4.q_lora_rank=48",
    "model.v4.o_lora_rank=40", "model.v4.window_size=8", "model.v4.index_head_dim=16", "model.v4.index_topk=4",
    "model.moe.n_routed_experts=8", "model.moe.n_activated_experts=2", "model.moe.moe_inter_dim=24",
]
V4_MESHES = ("fsdp_ep", "fsdp_tp")
# the composed tiny model (MLA + DSA on mHC streams, V4-style MoE): one dense and one hash-routed
# MoE layer (plus the learned-routing MTP block), T = 32 > index_topk = 8
COMPOSED_SMALL = [*SMALL, "model.index.index_topk=8"]
# the tiny V4.1 with its 9 layers (ratio-2 and ratio-1 sources, reuse, reindex under the candidate pool,
# Engram on layers 1 and 4, single-pass mHC, DSpark): T = 32 > window 8, 16 ratio-1 entries > index_topk
# 4; D=64 and E=16 divide the fsdp / expert splits; Engram rows shard over the `engram_rows` rule. The
# KV / indexer fake-quant is off: it is discontinuous, so a sharded sum's last-bit difference can move a
# value across an FP4 rounding boundary (tests/models/test_v41.py covers it)
V41_SMALL = [
    "model.vocab_size=512", "data.seq_len=32", "data.global_batch_size=8", "model.dim=64", "model.v4.window_size=8",
    "model.v4.index_topk=4", "model.shared_kv.candidate_topk_blocks=2", "model.engram.compressed_vocab_size=512",
    "model.shared_kv.qat=false",
]
SMALLS = {"tiny": SMALL, "tiny_v32": V32_SMALL, "tiny_v4": V4_SMALL, "tiny_composed": COMPOSED_SMALL,
          "tiny_v41": V41_SMALL}
# ... reading images, video and audio (on top of V41_SMALL), cut to 3 layers (sliding window; a ratio-2
# kv and index source with Engram before it; the ratio-1 kv and candidate source) without DSpark (which
# never sees the media; the 9-layer test above covers it) so that a compile takes ~5 s: a 2-block ViT
# (W=32, 2 heads, 4-pixel patches, 2×2 aligner windows), 4 video frame delimiters, audio at 8 kHz (16
# mels, two stride-2 convs, C=32). W, F, C and the heads divide the fsdp / tensor splits; the
# placeholders are the last 3 ids of V=512
V41_MEDIA = [
    "model.n_layers=3", "model.num_nextn_predict_layers=0", "model.dspark=null", "model.compress_ratios=[0,2,1]",
    "model.shared_kv.kv_source_layers=[1,2]", "model.shared_kv.index_source_layers=[1,2]",
    "model.shared_kv.candidate_source_layer=2", "model.engram.layer_ids=[1]", "model.engram.num_embeddings=[8214]",
    "model.vision={image_token_id: 509, hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 2, "
    "patch_size: 4, downsample_ratio: 2, min_pixels: 16, max_image_tokens: 16}",
    "model.video={video_token_id: 510, fps: 2.0, max_frames: 4, frame_max_tokens: 4}",
    "model.audio={audio_token_id: 511, sample_rate: 8000, n_fft: 200, hop_length: 80, n_mels: 16, fmin: 100.0, "
    "fmax: 4000.0, conv_channels: 32, conv_strides: [2, 2], max_seconds: 0.2}",
]
# XLA:CPU spends most of a compile in LLVM's optimisation passes; without them the tiny models compile
# ~3x faster and run about as fast (the HLO passes, SPMD partitioning included, are unchanged)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_spec = importlib.util.spec_from_file_location("regen", ROOT / "tests" / "golden" / "regenerate_shardings.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)


def small_cfg(mesh: str, *overrides: str, model: str = "tiny"):
    return load_config([ROOT / f"configs/model/{model}.yaml", ROOT / f"configs/mesh/{mesh}.yaml"],
                       [*SMALLS[model], *overrides])


def make_batch(cfg) -> dict:
    """Two packed documents per row, the last tokens padding; for V4 (whose attention takes the row's
    positions, `ModelConfig.row_positions`) one document per row, then the padding."""
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.model.vocab_size, (B, T)).astype(np.int32)
    cut = T if cfg.model.row_positions else T // 2 + 3
    segs = np.where(np.arange(T) < cut, 1, 2).astype(np.int32)[None].repeat(B, 0)
    segs[:, -4:] = 0
    positions = np.where(np.arange(T) < cut, np.arange(T), np.arange(T) - cut).astype(np.int32)[None].repeat(B, 0)
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segs, "loss_mask": segs > 0}
    if cfg.model.engram is not None:  # an identity vocabulary map: the hash on the raw ids
        layout = engram_layout(cfg.model.engram)
        batch["engram_rows"] = hash_rows(layout, np.arange(cfg.model.vocab_size), tokens, segs)
    return batch


def _b64(image_or_frames=None, wave_=None, rate: int = 8000) -> dict:
    """A PNG (one uint8 [H, W, 3] array), GIF (a list of them, 500 ms per frame) or 16-bit WAV as bytes_b64."""
    buf = io.BytesIO()
    if wave_ is not None:
        buf.write(wav_bytes((np.clip(wave_, -1, 1) * 32767).astype("<i2"), rate))
    elif isinstance(image_or_frames, list):
        first, *rest = [Image.fromarray(f) for f in image_or_frames]
        first.save(buf, "GIF", save_all=True, append_images=rest, duration=500, loop=0)
    else:
        Image.fromarray(image_or_frames).save(buf, "PNG")
    return {"bytes_b64": base64.b64encode(buf.getvalue()).decode()}


MEDIA_WORDS = "which digit ? three hear this watch left a b".split()


def media_rows() -> list[list[dict]]:
    """One record per row (V4.1 attends by row position): images (a 12×20 picture = a 3×5 patch grid
    whose 2×2 windows pad to a 2×3 LLM grid, 8×8 and 16×16 ones), a 2-frame video of 8×8 frames (1×1
    grids), clips of 0.1 / 0.15 / 0.2 s (3 / 4 / 6 tokens), all three in row 3, text only in row 5."""
    rng = np.random.default_rng(0)
    pic = lambda h, w: {"image": _b64(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))}  # noqa: E731
    video = lambda: {"video": _b64([rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)])}  # noqa: E731
    tone = lambda s, f: {"audio": _b64(wave_=0.3 * np.sin(2 * np.pi * f * np.arange(int(s * 8000)) / 8000)  # noqa: E731
                                       + 0.05 * rng.standard_normal(int(s * 8000)))}
    text = lambda words, loss=True: {"text": words, "loss": loss}  # noqa: E731
    return [
        [text("which digit ?", False), pic(12, 20), text("three")],
        [text("watch", False), video(), text("left a b")],
        [text("hear this", False), tone(0.1, 697), text("a b")],
        [pic(12, 20), video(), tone(0.1, 1209), text("three left")],
        [pic(8, 8), text("a"), pic(8, 8), tone(0.2, 941), text("b")],
        [text("which digit ? three a b left watch hear this")],
        [text("a", False), pic(16, 16), text("three")],
        [tone(0.1, 770), tone(0.15, 1336), text("hear this")],
    ]


def make_media_batch(cfg) -> dict:
    """`media_rows` through the host path (media.encode RecordEncoder / collate_row, a word-level
    tokenizer) into [B, ...] arrays, with the Engram rows hashed with media spans dead (as the pipeline)."""
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2, **{w: 3 + 47 * i for i, w in enumerate(MEDIA_WORDS)}}
    tok = whitespace_words(vocab)
    encoder = RecordEncoder(cfg.model, Tokenizer(tok, Path("words")))
    budget = MediaBudget.for_model(cfg.model, max_patches=24, max_image_rows=8, max_audio_clips=2, max_audio_frames=21)
    records = [encoder.encode({"segments": segs}, ROOT, f"row {b}") for b, segs in enumerate(media_rows())]
    assert len(records) == cfg.data.global_batch_size
    rows = [collate_row([rec], cfg.data.seq_len, budget, pad_id=1) for rec in records]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    layout, dead_BT = engram_layout(cfg.model.engram), batch["media_slots"] >= 0
    batch["engram_rows"] = hash_rows(layout, np.arange(cfg.model.vocab_size), batch["tokens"], batch["segment_ids"],
                                     dead_BT)
    return batch


# the fan-in dims (among the non-stacking ones) of weights whose fan-in is not the first dim: V4's
# grouped output W_oa [W, P, X, Y] and W_ob [W, Y, D] and the mHC mixing φ [I, D, Z]; by full path, the
# ViT's W_o [N, Y, W], the aligner's W1 [W, r², F] and the audio convolutions [3, I, C]
FAN_IN = {"w_oa": slice(1, 3), "w_ob": slice(0, 2), "fn": slice(0, 2), "params/media/aligner/w1": slice(0, 2),
          "params/media/vision/blocks/attn/w_o": slice(0, 2), "params/media/audio/w_conv0": slice(0, 2),
          "params/media/audio/w_conv1": slice(0, 2)}


def init_variables(cfg):
    """Random variables from the declared shapes and axes (numpy: no init compile): norms 1, biases
    0, the embedding N(0, 1), matrices N(0, 1/fan-in) with fan-in the first non-stacking axis (or
    FAN_IN's), router biases spread over ±0.1 so the routing is not trivially uniform, and V4's
    hash tables A distinct random experts per token id."""
    model, boxed = build_model(cfg.model), regen.boxed_variables(cfg.model)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name, shape = "/".join(str(getattr(k, "key", k)) for k in path), leaf.value.shape
        if name.endswith("/tid2eid"):  # [..., V, A]
            E = cfg.model.moe.n_routed_experts
            return np.argsort(rng.random((*shape[:-1], E)), axis=-1)[..., : shape[-1]].astype(np.int32)
        if name.startswith("router/"):
            return rng.uniform(-0.1, 0.1, shape).astype(np.float32)
        if name.endswith(("/scale", "/bias")):
            return np.full(shape, 1.0 if name.endswith("scale") else 0.0, np.float32)
        dims = [n for n, a in zip(shape, leaf.names) if a not in ("layers", "experts")]
        fan_in = int(np.prod(dims[FAN_IN.get(name, FAN_IN.get(name.rsplit("/", 1)[-1], slice(0, 1)))]))
        std = 1.0 if name.endswith("embedding") else fan_in**-0.5
        return (std * rng.standard_normal(shape)).astype(np.float32)

    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    v = {c: boxed.get(c, {}) for c in ("params", "router")}  # no MoE layer: no router collection
    return model, jax.tree_util.tree_map_with_path(fill, v, is_leaf=is_boxed)


def grad_fn(model, cfg):
    def f(params, router, batch):
        (total, (terms, counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, router, batch, model, cfg)
        return {"total": total, **terms, "counts": counts["main"], "mtp_counts": counts["mtp"]}, grads
    return jax.jit(f)


def single_device(cfg, batch: dict | None = None):
    """Loss, terms, expert counts and gradients on one device, no mesh (on `make_batch` by default)."""
    model, v = init_variables(cfg)
    batch = make_batch(cfg) if batch is None else batch
    args = (v["params"], v["router"], batch)
    out, grads = grad_fn(model, cfg).lower(*args).compile(FAST_COMPILE)(*args)
    return v, batch, jax.device_get(out), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
    return single_device(small_cfg("single"))


@pytest.fixture(scope="module")
def reference_v32():
    return single_device(small_cfg("single", model="tiny_v32"))


@pytest.fixture(scope="module")
def reference_composed():
    return single_device(small_cfg("single", model="tiny_composed"))


@pytest.fixture(scope="module")
def reference_v4():
    return single_device(small_cfg("single", model="tiny_v4"))


def run_on_mesh(cfg, v, batch, lower_only=False):
    model = build_model(cfg.model)
    mesh, mesh_rules = make_mesh(cfg.mesh), rules(cfg.mesh)
    boxed = regen.boxed_variables(cfg.model)  # the logical axes: mesh-independent, traced once per model
    with activate(mesh, mesh_rules):
        p_sh, r_sh = (logical_shardings(boxed.get(c, {}), mesh, mesh_rules) for c in ("params", "router"))
        params, router = jax.device_put(v["params"], p_sh), jax.device_put(v["router"], r_sh)
        sharded = {k: jax.device_put(x, batch_sharding(mesh, mesh_rules)) for k, x in batch.items()}
        compiled = grad_fn(model, cfg).lower(params, router, sharded).compile(FAST_COMPILE)
        if lower_only:
            return compiled
        out, grads = compiled(params, router, sharded)
    return compiled, jax.device_get(out), jax.device_get(grads), params


def compare(out, grads, ref_out, ref_grads, what, scale_floors=None, rtols=None):
    """scale_floors: {parameter name: the magnitude its gradient is compared at, when larger than the
    gradient itself} for near-cancelling sums; rtols: {parameter-name fragment: rtol} for gradients
    that are ill-conditioned by construction (the caller names why)."""
    tol, scale_floors, rtols = TOL["resharded_f32"], scale_floors or {}, rtols or {}
    for k in ("total", "ce", "mtp", "balance", "index"):
        assert_close(out[k], ref_out[k], **tol, what=f"{what}: {k}")
    np.testing.assert_array_equal(out["counts"], ref_out["counts"], err_msg=f"{what}: expert counts")
    np.testing.assert_array_equal(out["mtp_counts"], ref_out["mtp_counts"], err_msg=f"{what}: MTP expert counts")
    assert float(out["dropped_frac"]) == 0.0, what
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    worst = (0.0, "")
    for (path, g), g_ref in zip(flat, jax.tree.leaves(ref_grads)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name in scale_floors:
            floor = max(scale_floors[name], float(np.max(np.abs(g_ref))))
            assert_close(g / floor, g_ref / floor, rtol=tol["rtol"], atol=tol["rtol"],
                         what=f"{what}: grad {name} / {floor:g}")
        else:
            rtol = next((r for frag, r in rtols.items() if frag in name), tol["rtol"])
            assert_close_to_scale(g, g_ref, rtol, what=f"{what}: grad {name}")
        worst = max(worst, (float(np.max(np.abs(g - g_ref)) / (np.max(np.abs(g_ref)) or 1.0)), name))
    print(f"{what}: |Δ total| {abs(float(out['total']) - float(ref_out['total'])):.2e}, "
          f"max grad err / max|grad| {worst[0]:.2e} ({worst[1]})")


@pytest.mark.parametrize("mesh", slow_unless(MESHES, INNER_LOOP_MESHES))
def test_layout_invariance_every_mesh(mesh, reference):
    """Loss, gradients, expert counts and balance loss equal the single-device ones (ring dispatch)."""
    v, batch, ref_out, ref_grads = reference
    _, out, grads, params = run_on_mesh(small_cfg(mesh), v, batch)
    compare(out, grads, ref_out, ref_grads, mesh)


@pytest.mark.parametrize("mesh", slow_unless(V32_MESHES, ("fsdp_tp",)))  # ep_tp: ~1.5 s warm, ~3.5 s cold
def test_layout_invariance_v32(mesh, reference_v32):
    """The tiny V3.2's DSA blocks: loss, indexer KL and gradients equal the single-device ones."""
    v, batch, ref_out, ref_grads = reference_v32
    assert float(ref_out["index"]) > 0
    _, out, grads, _ = run_on_mesh(small_cfg(mesh, model="tiny_v32"), v, batch)
    compare(out, grads, ref_out, ref_grads, f"tiny_v32/{mesh}")


@pytest.mark.slow  # ~25 s each (one V4 grad lowering and compile on 8 devices), the reference ~20 s
@pytest.mark.parametrize("mesh", V4_MESHES)
def test_layout_invariance_v4(mesh, reference_v4):
    """The tiny V4 (CSA + hash routing, HCA + learned routing, SWA MTP, mHC): loss terms, expert
    counts of both routings and gradients equal the single-device ones."""
    v, batch, ref_out, ref_grads = reference_v4
    cfg = small_cfg(mesh, model="tiny_v4")
    m, T = cfg.model, cfg.data.seq_len
    assert m.compress_ratios == (4, 8, 0) and m.moe.n_hash_layers == 1 and T // 4 > m.v4.index_topk
    assert m.v4.window_size < T and m.mhc.hc_mult > 1 and m.num_nextn_predict_layers == 1
    _, out, grads, _ = run_on_mesh(cfg, v, batch)
    # the mHC mixing scales (`*_hc/scale`, `hc_head/scale`: one to three scalars each) are sums over all
    # B·T tokens that the layout regroups (test_context_parallel: 1e-4 there too); with the loss's input
    # gradient formed in its forward pass (losses._fused_nll_sum) fsdp_ep / fsdp_tp measured 2.0e-5 / 2.2e-5
    # on the MTP's hc_head/scale. Every other gradient and the loss terms at rtol 1e-5
    compare(out, grads, ref_out, ref_grads, f"tiny_v4/{mesh}", rtols={"_hc/scale": 1e-4, "hc_head/scale": 1e-4})


@pytest.fixture(scope="module")
def reference_v41():
    return single_device(small_cfg("single", model="tiny_v41"))


@pytest.mark.slow  # ~20 s each (a V4.1 grad lowering and compile on 8 devices), the reference ~20 s
@pytest.mark.parametrize("mesh", V4_MESHES)
def test_layout_invariance_v41(mesh, reference_v41):
    """The tiny V4.1 (shared compressed KV with every role, Engram tables split by `engram_rows`,
    single-pass mHC, DSpark): loss terms, expert counts and gradients equal the single-device ones."""
    v, batch, ref_out, ref_grads = reference_v41
    cfg = small_cfg(mesh, model="tiny_v41")
    assert cfg.data.seq_len > cfg.model.v4.window_size and cfg.data.seq_len // 2 > cfg.model.v4.index_topk
    _, out, grads, _ = run_on_mesh(cfg, v, batch)
    # Engram's gate σ(sign(d)·√|d|) has slope 1/(2√|d|): for the tokens whose gate dot d is near 0 a
    # last-bit difference ε in d moves the gradient by ~ε/|d| (1e-3 here), and those tokens dominate the
    # q/k-weight gradients; the forward and every other gradient stay at the default 1e-5
    compare(out, grads, ref_out, ref_grads, f"tiny_v41/{mesh}", rtols={"/engram/": 1e-2})


@pytest.fixture(scope="module")
def reference_v41_media():
    cfg = small_cfg("single", *V41_MEDIA, model="tiny_v41")
    return single_device(cfg, make_media_batch(cfg))


@pytest.mark.slow  # ~11 s per mesh with the reference (the inner loop keeps the text-only V4.1 meshes)
@pytest.mark.parametrize("mesh", V4_MESHES)
def test_layout_invariance_v41_media(mesh, reference_v41_media):
    """The tiny V4.1 reading images, a video and audio (ViT + aligner, audio front-end, delimiters and
    frame vectors merged into the spans; router bias_vl and Engram gated off there): loss terms, expert
    counts and gradients, the media front-ends' included, equal the single-device ones."""
    v, batch, ref_out, ref_grads = reference_v41_media
    slots = set(np.unique(batch["media_slots"]).tolist())
    assert slots == {S.TEXT, *range(S.N_SLOTS)}, f"slot codes in the batch: {sorted(slots)}"
    assert (batch["unshuffle"] == -1).any() and (batch["patch_pic"] == -1).any() and (batch["mel_len"] == 0).any()
    silent = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(ref_grads["media"])
              if not np.any(g)]
    assert not silent, f"media parameters without gradient: {silent}"
    _, out, grads, _ = run_on_mesh(small_cfg(mesh, *V41_MEDIA, model="tiny_v41"), v, batch)
    # as the text V4.1: every term and gradient at rtol 1e-5, the Engram weights at 1e-2 (its gate's slope)
    compare(out, grads, ref_out, ref_grads, f"tiny_v41_media/{mesh}", rtols={"/engram/": 1e-2})


@pytest.mark.parametrize("dispatch", slow_unless(["a2a", "dense"], ("a2a",)))  # dense: ~2 s warm, ~5 s cold
def test_layout_invariance_dropless_dispatch_fsdp_ep(dispatch, reference):
    """The other CPU strategies at capacity_factor=0 (dropless) on the whole model."""
    v, batch, ref_out, ref_grads = reference
    cfg = small_cfg("fsdp_ep", f"model.moe.dispatch={dispatch}")
    _, out, grads, _ = run_on_mesh(cfg, v, batch)
    compare(out, grads, ref_out, ref_grads, f"fsdp_ep/{dispatch}")


def _collectives(hlo: str) -> list[tuple[str, str, str]]:
    """(kind, result shape text, op_name) of every collective in optimized HLO."""
    kinds = "all-gather|all-to-all|reduce-scatter|all-reduce|collective-permute"
    pat = re.compile(rf"=\s*(\S+|\(.*?\))\s+({kinds})(?:-start)?\(.*?op_name=\"([^\"]*)\"")
    return [(m.group(2), m.group(1), m.group(3)) for m in pat.finditer(hlo)]


@pytest.mark.parametrize("dispatch,needs", [("a2a", {"all-to-all"}), ("ring", {"all-gather", "reduce-scatter"})])
def test_fsdp_ep_hlo_collectives(dispatch, needs, reference):
    """The dispatch's collectives sit in the MoE's shard_map, and no all-gather rebuilds an expert
    weight with all E experts (the expert axis is never gathered; FSDP's gather of D is)."""
    v, batch, _, _ = reference
    hlo = run_on_mesh(small_cfg("fsdp_ep", f"model.moe.dispatch={dispatch}"), v, batch, lower_only=True).as_text()
    ops = _collectives(hlo)
    in_dispatch = {k for k, _, name in ops if "/experts/shard_map" in name}
    assert needs <= in_dispatch, f"{dispatch}: missing {needs - in_dispatch} in the dispatch ({sorted(in_dispatch)})"
    cfg = small_cfg("fsdp_ep")
    E, D, F = cfg.model.moe.n_routed_experts, cfg.model.dim, cfg.model.moe.moe_inter_dim
    full = [f"{E},{D},{F}]", f"{E},{F},{D}]"]  # an expert weight with all E experts
    gathered = [s for k, s, _ in ops if k == "all-gather" and any(f in s for f in full)]
    assert not gathered, f"expert weights all-gathered over the expert axis: {gathered}"
    local = [f"{E // 4},{D},{F}]", f"{E // 4},{F},{D}]"]  # E/4 local experts with D gathered over fsdp
    assert any(k == "all-gather" and any(f in s for f in local) for k, s, _ in ops), "no FSDP gather of local experts"


@pytest.mark.parametrize("model", sorted(regen.MODELS))
@pytest.mark.parametrize("mesh", MESHES)
def test_golden_partition_specs(mesh, model):
    path = ROOT / "configs" / "mesh" / f"{mesh}.yaml"
    golden = regen.golden_path(model, path)
    assert golden.exists(), f"{golden} missing: run python tests/golden/regenerate_shardings.py"
    got = regen.render(model, path)
    assert got == golden.read_text(), (
        f"partition specs under {mesh} changed; if intended, run python tests/golden/regenerate_shardings.py "
        "and review the diff"
    )


@functools.cache
def flash_media_params():
    """V4.1-Flash's model config with a video and an audio front-end at their default sizes added (the
    release has vision only), and 'name' -> (shape, logical axes) of its media parameters (MediaEmbed
    alone, initialised abstractly)."""
    model = load_config([ROOT / "configs/model/deepseek_v41_flash.yaml"],
                        ["model.video={video_token_id: 129265}", "model.audio={audio_token_id: 129266}"]).model
    x_BTD = jax.ShapeDtypeStruct((1, 8, model.dim), jnp.float32)
    boxed = jax.eval_shape(MediaEmbed(model).init, jax.random.key(0), x_BTD, init_media(model, 8))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return model, {"/".join(k.key for k in path): (leaf.value.shape, leaf.names) for path, leaf in leaves}


@pytest.mark.parametrize("mesh", MESHES)
def test_media_params_shard_sensibly(mesh):
    """V4.1-Flash's media front-ends on 256 devices (abstract mesh): the ViT blocks stack on a leading
    `layers` axis; an `embed` dim is the ViT width W (tower, aligner input) or the LM width D (aligner
    output, audio, delimiters, frame vectors); every split divides its dim evenly; and every weight of
    >= 1 MiB is split at least as many ways as the mesh splits `embed` (as the text model's weights are)."""
    model, params = flash_media_params()
    mesh_cfg = load_config([ROOT / "configs/model/tiny.yaml", ROOT / f"configs/mesh/{mesh}.yaml"]).mesh
    sizes, mesh_rules = abstract_mesh(mesh_cfg, 256).shape, rules(mesh_cfg)
    ways = lambda entry: int(np.prod([sizes[a] for a in spec_axes([entry])]))  # noqa: E731
    embed_ways = ways(nn.logical_to_mesh_axes(("embed",), mesh_rules)[0])
    assert {"vision/blocks/attn/w_qkv", "aligner/w1", "audio/w_proj2", "image_newline", "video_frame"} <= set(params)
    for name, (shape, names) in params.items():
        if name.startswith("vision/blocks/"):
            assert names[0] == "layers" and shape[0] == model.vision.num_layers, f"{name}: {names} {shape}"
        else:
            assert "layers" not in names, f"{name}: {names}"
        width = model.vision.hidden_size if name.startswith("vision/") or name == "aligner/w1" else model.dim
        assert all(n == width for n, a in zip(shape, names) if a == "embed"), f"{name}: {shape} {names} (width {width})"
        spec = nn.logical_to_mesh_axes(names, mesh_rules)
        assert all(n % ways(e) == 0 for n, e in zip(shape, spec)), f"{mesh}: {name} {shape} split {spec}"
        if np.prod(shape) * 4 >= 2**20:
            assert np.prod([ways(e) for e in spec]) >= embed_ways, f"{mesh}: {name} {shape} split only {spec}"


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_file_names_every_logical_axis(mesh):
    raw = yaml.safe_load((ROOT / "configs" / "mesh" / f"{mesh}.yaml").read_text())
    named = {name for name, _ in raw["mesh"]["rules"]}
    assert named == set(LOGICAL_AXES), f"{mesh}.yaml: missing {LOGICAL_AXES - named}, unknown {named - LOGICAL_AXES}"
    assert raw["mesh"]["axes"] == list(MESH_AXES)


def test_mesh_shape_errors_name_the_field():
    cfg = small_cfg("fsdp_ep")
    with pytest.raises(ConfigError, match=r"mesh.shape \[1, -1, 1, 4, 1\] does not fit 6 devices"):
        make_mesh(cfg.mesh, jax.devices()[:6])
    with pytest.raises(ConfigError, match="unknown mesh axis 'expert_axis'"):
        load_config([ROOT / "configs/model/tiny.yaml"], ["mesh.rules=[[experts, expert_axis]]"])


def test_only_sharding_names_mesh_axes():
    """Physical mesh axis names appear only in sharding.py (and the MESH_AXES schema in config.py)."""
    distinctive = set(MESH_AXES) - {"data"}  # "data" is also a config section and checkpoint item
    found = []
    for f in sorted((ROOT / "deepseek_jax").rglob("*.py")):
        if f.name == "sharding.py":
            continue
        tree = ast.parse(f.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MESH_AXES" for t in node.targets):
                allowed |= {id(n) for n in ast.walk(node.value)}
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "P", "PartitionSpec"):
                found += [f"{f.name}:{n.lineno} PartitionSpec names {n.value!r}" for n in ast.walk(node)
                          if isinstance(n, ast.Constant) and n.value in MESH_AXES]
        found += [f"{f.name}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in distinctive and id(n) not in allowed]
    assert not found, f"mesh axis names outside sharding.py: {found}"


@pytest.mark.slow  # one grad compile of the composed model on 8 devices, plus the reference
def test_layout_invariance_composed(reference_composed):
    """MLA + DSA on mHC streams with V4-style MoE (hash + learned routing): fsdp_ep equals one device."""
    v, batch, ref_out, ref_grads = reference_composed
    cfg = small_cfg("fsdp_ep", model="tiny_composed")
    m = cfg.model
    assert m.mhc.hc_mult > 1 and m.index.index_topk < cfg.data.seq_len and m.moe.n_hash_layers == 1
    assert float(ref_out["index"]) > 0
    _, out, grads, _ = run_on_mesh(cfg, v, batch)
    # the HyperHeads' scale gradients are near-cancelling sums over tokens: |g| ≈ 6e-5 (main) and
    # 1e-5 (MTP) while single rows' gradients reach 5e-3, so reordering the sums over 8 devices moves
    # them by ~5e-9 (2e-5 to 8e-5 of themselves, past rtol 1e-5 of their own size); they are
    # compared at the size of their parts instead
    floors = {"hc_head/scale": 1e-3, "mtp_0/hc_head/scale": 1e-3}
    compare(out, grads, ref_out, ref_grads, "tiny_composed/fsdp_ep", scale_floors=floors)
