"""DeepSeek-V4.1 with images (ViT + 2D RoPE + aligner + span merge + bias_vl + Engram masks) at fp32 parity
with a fixture, tests/golden/v41_vision (generate_fixture.py there says how it was made; NOTES.md which
reference checks what):

- inputs: transformers' own processor (@a290b39f) made `pixel_values`, `image_grid_thw` and the expanded
  `input_ids` of two rows (text, a 15×15-patch photo, text, a 16×12 px image (6×8 patches -> 2×3 LLM grid,
  width padded), text; text, an 11×18-patch photo, text, 3 pads). Ours must equal them exactly: the
  patches from media/image.py's `preprocess_image`, the ids from `expand_image_tokens`.
- vision: the fixture's float64 numpy statement (vision_reference.py) of the ViT and the aligner; ours within
  1e-5 (fp32 vs float64, output scale ~1).
- everything after the merge: transformers' text model @0a2080b4 (tests/golden/v41's weights) fed the merged
  embeddings, with the image span DEAD for the n-gram hash and gated off in Engram, and `bias_vl` on span
  tokens (through hooks; that revision does not pass the image mask itself). Its cache path is the target
  (as tests/parity/test_parity_v41.py), with the fake quantisation (ours: shared_kv.qat) on and off.

Required: max |Δlogit| ≤ 1e-4 and KL ≤ 1e-6 over the non-pad positions, routed experts, indexer picks and
Engram row ids identical. The fixture's margins (meta.json) are ≥ 2.1e-4 (router, indexer, candidate blocks);
the closest fake-quant value sits 5.8e-6 (relative) from a rounding midpoint.
"""

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from deepseek_jax.convert import table, v41
from deepseek_jax.engram_hash import compressed_vocab, engram_layout, hash_rows
from deepseek_jax.layers.vision import Aligner, VisionTower
from deepseek_jax.media.image import (
    expand_image_tokens,
    load_image,
    preprocess_image,
    unshuffle_index,
)
from deepseek_jax.media.slots import IMAGE, MediaInputs
from deepseek_jax.models import build_model
from tests.utils import ROOT, by_layer, kl

pytestmark = [pytest.mark.parity, pytest.mark.slow]
FIXTURE, V41 = ROOT / "tests" / "golden" / "v41_vision", ROOT / "tests" / "golden" / "v41"
DEFAULT_XLA = {"xla_backend_optimization_level": 3}  # the QAT rounding: see tests/parity/test_parity_v41.py


def _sample(name):
    """A picture of the model inputs, as our pipeline loads it (package files) or the stored array."""
    import importlib.resources

    samples = json.loads((FIXTURE / "processor.json").read_text())["samples"]
    if name in samples:
        s = samples[name]
        return load_image(str(importlib.resources.files(s["package"]).joinpath(s["file"])), name)
    return Image.fromarray(load_file(FIXTURE / "reference.safetensors")[f"images.{name}"])


@pytest.fixture(scope="module")
def fx():
    ref = load_file(FIXTURE / "reference.safetensors")
    meta = json.loads((FIXTURE / "meta.json").read_text())
    cfg = v41.config_from_json(json.loads((FIXTURE / "config.json").read_text()), dtype="float32",
                               max_seq_len=128, num_nextn_predict_layers=0)
    state = {**load_file(V41 / "weights.safetensors"), **load_file(FIXTURE / "weights.safetensors")}
    variables = table.to_variables(state, v41.FAMILY, cfg, "hf_text")
    pics = [[preprocess_image(_sample(n), cfg.vision) for n in row] for row in meta["run"]["images_per_row"]]
    return cfg, ref, meta, variables, pics


def _media(cfg, pics, slots_BT):
    """MediaInputs of the fixture's rows: each row's pictures packed (patches, their grid positions, picture
    ids, aligner windows offset into the row), IMAGE slots numbered in reading order."""
    r, C = cfg.vision.downsample_ratio, cfg.vision.patch_dim
    P = max(sum(len(p) for p, _ in row) for row in pics)
    M = max(sum(-(-h // r) * -(-w // r) for _, (h, w) in row) for row in pics)
    B = len(pics)
    patches, pos = np.zeros((B, P, C), np.float32), np.zeros((B, P, 2), np.int32)
    pic, unshuffle = np.full((B, P), -1, np.int32), np.full((B, M, r * r), -1, np.int32)
    for b, row in enumerate(pics):
        p0 = m0 = 0
        for k, (x, (h, w)) in enumerate(row):
            patches[b, p0:p0 + h * w], pic[b, p0:p0 + h * w] = x, k
            pos[b, p0:p0 + h * w] = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
            u = unshuffle_index(h, w, r)
            unshuffle[b, m0:m0 + len(u)] = np.where(u >= 0, u + p0, -1)
            p0, m0 = p0 + h * w, m0 + len(u)
    rows = np.where(slots_BT == IMAGE, np.cumsum(slots_BT == IMAGE, axis=1) - 1, 0).astype(np.int32)
    return MediaInputs(slots=jnp.asarray(slots_BT, jnp.int32), rows=jnp.asarray(rows), patches=jnp.asarray(patches),
                       patch_pos=jnp.asarray(pos), patch_pic=jnp.asarray(pic), unshuffle=jnp.asarray(unshuffle))


def _ids_and_slots(cfg, meta, ref):
    """Our expansion of the prompts (tokenised by the fixture's tokenizer), right-padded like HF's."""
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    T, k = ref["input_ids"].shape[1], 0
    ids, slots = np.full((2, T), tok.token_to_id("<pad>"), np.int32), np.full((2, T), -1, np.int32)
    grids = [tuple(g[1:]) for g in ref["image_grid_thw"]]
    for b, text in enumerate(meta["run"]["prompts"]):
        n = text.count(meta_token(meta))
        i, s = expand_image_tokens(tok.encode(text, add_special_tokens=False).ids, grids[k:k + n], cfg.vision)
        ids[b, :len(i)], slots[b, :len(s)] = i, s
        k += n
    return ids, slots


def meta_token(meta):
    return json.loads((FIXTURE / "processor.json").read_text())["image_token"]


def test_our_processor_makes_the_fixture_inputs(fx):
    cfg, ref, meta, _, pics = fx
    flat = [p for row in pics for p in row]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in flat]), ref["pixel_values"])  # exact
    np.testing.assert_array_equal([[1, *g] for _, g in flat], ref["image_grid_thw"])
    ids, slots = _ids_and_slots(cfg, meta, ref)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(slots, ref["slots"])
    np.testing.assert_array_equal(ids != 2, ref["attention_mask"].astype(bool))


def test_vision_tower_and_aligner_match_the_float64_reference(fx):
    cfg, ref, _, variables, pics = fx
    media = _media(cfg, pics, ref["slots"])
    p = variables["params"]["media"]
    with jax.default_matmul_precision("highest"):
        feats = VisionTower(cfg.vision, jnp.float32).apply({"params": p["vision"]}, media.patches, media.patch_pos,
                                                           media.patch_pic)
        rows = Aligner(cfg.vision, cfg.dim, jnp.float32).apply({"params": p["aligner"]}, feats, media.unshuffle)
    feats, rows, pic = np.asarray(feats), np.asarray(rows), np.asarray(media.patch_pic)
    got_v = np.concatenate([feats[b][pic[b] >= 0] for b in range(2)])
    real = (np.asarray(media.unshuffle) >= 0).any(-1)
    got_a = np.concatenate([rows[b][real[b]] for b in range(2)])
    err_v, err_a = np.abs(got_v - ref["vision.out"]).max(), np.abs(got_a - ref["aligner.out"]).max()
    print(f"ViT max |Δ| {err_v:.1e} (scale {np.abs(ref['vision.out']).max():.1f}), aligner {err_a:.1e} "
          f"(scale {np.abs(ref['aligner.out']).max():.1f})")
    assert got_v.shape == ref["vision.out"].shape and got_a.shape == ref["aligner.out"].shape
    assert err_v <= 1e-5 and err_a <= 1e-5


@pytest.fixture(scope="module", params=["qat", "noqat"])
def run(request, fx):
    """(cfg, reference under our key names, Engram rows, output, intermediates) for the fake-quant reference
    ("qat", compiled at XLA's default level) or the one without it ("noqat")."""
    cfg, ref, _, variables, pics = fx
    if request.param == "noqat":
        cfg = dataclasses.replace(cfg, shared_kv=dataclasses.replace(cfg.shared_kv, qat=False))
        ref = {**ref, **{k.removeprefix("noqat."): v for k, v in ref.items() if k.startswith("noqat.")}}
    tokens, slots = ref["input_ids"].astype(np.int32), ref["slots"]
    cmap = compressed_vocab(Tokenizer.from_file(str(FIXTURE / "tokenizer.json")))
    dead = (ref["attention_mask"] == 0) | (slots >= 0)
    rows = hash_rows(engram_layout(cfg.engram), cmap, tokens, dead_BT=dead)
    media = _media(cfg, pics, slots)
    model = build_model(cfg)
    forward = jax.jit(lambda v, t, r, m: model.apply(v, t, engram_rows=r, mtp=False, media=m,
                                                     mutable=["intermediates"]))
    options = DEFAULT_XLA if request.param == "qat" else {}
    with jax.default_matmul_precision("highest"):
        out, state = forward.lower(variables, tokens, rows, media).compile(options)(variables, tokens, rows, media)
    return cfg, ref, cmap, rows, out, state["intermediates"]


def test_engram_ids_equal_hf(run):
    _, ref, _, rows, _, _ = run
    np.testing.assert_array_equal(rows, ref["engram.hash_ids"])


def test_logits_match_hf(run):
    cfg, ref, _, _, out, _ = run
    live = ref["attention_mask"].astype(bool)
    got, want = np.asarray(out.logits, np.float64)[live], ref["logits"].astype(np.float64)[live]
    worst, kl_max = float(np.abs(got - want).max()), float(np.max(kl(want, got)))  # float64
    which = "fake-quant" if cfg.shared_kv.qat else "no fake-quant"
    print(f"V4.1 + vision vs the fixture ({which}): max |Δlogit| {worst:.2e}, max KL {kl_max:.2e} "
          f"(logit scale {np.abs(want).max():.1f})")
    assert worst <= 1e-4 and kl_max <= 1e-6


def test_routed_experts_equal_hf(run):
    """bias_vl picks the experts of span tokens (meta: it moves 1-7 tokens per layer against `bias`)."""
    cfg, ref, _, _, _, inter = run
    live = ref["attention_mask"].astype(bool)
    experts = by_layer(inter, cfg, "ffn", "experts_MA", 0)
    assert sorted(experts) == list(range(cfg.n_layers))
    for layer, e in experts.items():
        got = np.sort(e.reshape(2, -1, e.shape[-1]), axis=-1)
        np.testing.assert_array_equal(got[live], ref[f"layers.{layer}.ffn.expert_ids"][live], err_msg=f"layer {layer}")


def test_indexer_picks_equal_hf(run):
    cfg, ref, _, _, _, inter = run
    live = ref["attention_mask"].astype(bool)
    picks = by_layer(inter, cfg, "attn", "index_topk_BTU", 0)
    assert sorted(picks) == list(cfg.shared_kv.index_source_layers)
    def ordered(x):  # sorted, -1 (no pick) last
        return np.sort(np.where(x < 0, np.iinfo(np.int32).max, x), -1)[live]

    for layer, p in picks.items():
        want = ordered(ref[f"layers.{layer}.indexer.topk_ids"])
        np.testing.assert_array_equal(ordered(p), want, err_msg=f"layer {layer}")


def test_fixture_provenance():
    """The fixture's text model is tests/golden/v41's, byte for byte."""
    meta = json.loads((FIXTURE / "meta.json").read_text())
    for name, key in (("weights.safetensors", "text_weights_sha256"), ("tokenizer.json", "text_tokenizer_sha256")):
        assert hashlib.sha256((V41 / name).read_bytes()).hexdigest() == meta["source"][key], name
    assert meta["source"]["text_model_commit"].startswith("0a2080b4")
    assert meta["source"]["processor_commit"].startswith("a290b39f")
