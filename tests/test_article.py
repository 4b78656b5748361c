"""The tiny article model (configs/model/tiny_article.yaml) is the full-size one's structure
(configs/model/deepseek_v4_article.yaml) at CPU size, and every part of it is live in a train step.

Structure (fast, `eval_shape` only): the same parameter paths, with the numbers in them (layer, segment,
Engram layer ids) normalised, the same logical axes per path, and every parameter category of the full
model nonzero in the tiny one. The demo run's config (configs/train/tiny_article_multimodal.yaml)
is tiny_article with only the demo data's fields changed.

Liveness (slow: the train step's gradient and bias update, jitted once): one packed row holding one
record of text, an image, a 4-frame video and a 0.6 s audio clip, 71 positions long, built by the
record pipeline itself (media/encode.py) from media files synthesised as the demo does
(data/demo_media.py). The step must give a finite loss and a nonzero gradient for every parameter leaf
(the indexer only through its KL: its inputs are detached in the sparse stage); the indexer picks
must leave visible keys out (the record is longer than index_topk, so DSA's selection decides
something); positions start at POSITION_OFFSET so they run past rope.original_seq_len (YaRN's
interpolated frequencies are the ones that matter there); and after the bias update every listed router bias
row, `bias` and `bias_vl`, has moved.
"""

import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from deepseek_jax.config import load_config, load_model_config
from deepseek_jax.data import demo_media as dm
from deepseek_jax.engram_hash import engram_layout, hash_rows
from deepseek_jax.media.encode import MediaBudget, RecordEncoder, collate_row
from deepseek_jax.media.slots import media_from_batch
from deepseek_jax.models import router_bias_rows
from deepseek_jax.params import CATEGORIES, category, param_shapes
from deepseek_jax.program import build_program
from deepseek_jax.sharding import make_mesh, rules
from deepseek_jax.tokenizer import Tokenizer
from deepseek_jax.train import loss_fn, update_biases
from tests.utils import ROOT

FULL = ROOT / "configs/model/deepseek_v4_article.yaml"
TINY = ROOT / "configs/model/tiny_article.yaml"
DEMO_RUN = ROOT / "configs/train/tiny_article_multimodal.yaml"
T = 128  # one row: the 71-position record, then padding
POSITION_OFFSET = 200  # the record's positions run 200..270, past tiny_article's original_seq_len (256)


def _normalised(name: str) -> str:
    """A parameter path with its numbers (layer, segment, Engram layer ids) replaced by '#'."""
    return re.sub(r"\d+(_\d+)*", "#", name)  # layers_3_19 (a scanned range) -> layers_#


def _structure(shapes: dict) -> dict[str, set]:
    """normalised path -> the set of logical-axes tuples its leaves carry (shapes: params.param_shapes)."""
    out: dict[str, set] = {}
    for name, (_, axes) in shapes.items():
        out.setdefault(_normalised(name), set()).add(axes)
    return out


# ----------------------------------------------------------------------------------------------
# Structure


@pytest.fixture(scope="module")
def full_and_tiny():
    """(config, params.param_shapes) of the full and the tiny article model (one eval_shape each)."""
    return tuple((cfg, param_shapes(cfg)) for cfg in (load_model_config([FULL]), load_model_config([TINY])))


def _by_category(shapes: dict) -> dict[str, int]:
    """params.count_by_category on shapes already taken."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, (shape, axes) in shapes.items():
        counts[category(name, axes)] += math.prod(shape)
    return counts


def test_tiny_has_the_full_models_parameter_paths(full_and_tiny):
    """Same leaves (numbers normalised) with the same logical axes: nothing of the full model is
    missing at CPU size and nothing extra is there."""
    full, tiny = (_structure(shapes) for _, shapes in full_and_tiny)
    only_full, only_tiny = sorted(set(full) - set(tiny)), sorted(set(tiny) - set(full))
    assert not only_full and not only_tiny, f"only in the full model: {only_full}; only in the tiny one: {only_tiny}"
    differ = {k: (full[k], tiny[k]) for k in full if full[k] != tiny[k]}
    assert not differ, f"logical axes differ (full, tiny): {differ}"


def test_every_full_size_category_is_nonzero_in_the_tiny_model(full_and_tiny):
    full, tiny = (_by_category(shapes) for _, shapes in full_and_tiny)
    want = {k for k in CATEGORIES if full[k]}
    assert want == {k for k in CATEGORIES if tiny[k]}, (full, tiny)
    # every part the article names is there (a config that dropped one would shrink both sets alike)
    assert want >= {"embedding", "attention", "routed", "shared", "router", "mhc", "engram_table", "engram",
                    "mtp_routed", "mtp_other", "vision", "aligner", "audio", "delimiters", "head", "norms"}


def _flat(x, prefix: str = "") -> dict:
    """A config dataclass as {'a.b.c': leaf}."""
    if dataclasses.is_dataclass(x):
        fields = dataclasses.fields(x)
        return {k: v for f in fields for k, v in _flat(getattr(x, f.name), f"{prefix}{f.name}.").items()}
    return {prefix[:-1]: x}


def test_demo_run_changes_only_what_the_demo_data_needs(full_and_tiny):
    """tiny_article_multimodal.yaml = tiny_article with the demo's 64-id tokenizer (vocabulary,
    placeholders, Engram's folding and pad) and a DSA top-k below the demo's record lengths; its data,
    optimizer and schedule are tiny_multimodal.yaml's."""
    _, (tiny, _) = full_and_tiny
    run = load_config([DEMO_RUN])
    got, want = _flat(run.model), _flat(tiny)
    changed = {k: (want[k], got[k]) for k in want if got[k] != want[k]}
    assert changed == {
        "vocab_size": (4096, 64), "index.index_topk": (64, 16), "engram.compressed_vocab_size": (4096, 64),
        "engram.pad_id": (0, 1), "vision.image_token_id": (4093, 61), "video.video_token_id": (4094, 62),
        "audio.audio_token_id": (4095, 63),
    }, changed  # fmt: skip
    demo = load_config([ROOT / "configs/train/tiny_multimodal.yaml"])
    assert (run.data, run.optim) == (demo.data, demo.optim)
    assert dataclasses.replace(run.train, run_dir=demo.train.run_dir) == demo.train
    assert run.model.index.index_topk < 25 < run.data.seq_len  # live on the audio (25) and video (35) records


# ----------------------------------------------------------------------------------------------
# Every part live in one train step


def _record_files(root) -> dict:
    """A record with text, an image, a video and an audio clip, its files written as the demo writes
    them (a 16×16 digit-like PNG, a 4-frame GIF of it moving left, 0.6 s of three DTMF tones)."""
    rng = np.random.default_rng(0)
    sprite_88 = np.zeros((8, 8))
    sprite_88[1:7, 2:6] = 16.0  # a bar, values on the demo's 0–16 scale
    from PIL import Image

    Image.fromarray(dm.digit_image(sprite_88, rng, 2), mode="L").save(root / "image.png")
    dm.write_gif(root / "video.gif", dm.motion_frames(sprite_88, "left", rng, 16, 4), 2.0)
    dm.write_wav(root / "audio.wav", dm.dtmf_clip([3, 1, 4], rng, 8000, 0.6), 8000)
    return {"tag": "all", "segments": [
        {"text": "which digit ?", "loss": False}, {"image": "image.png"}, {"text": " 1 which way ?"},
        {"video": "video.gif"}, {"text": " left which tones ?"}, {"audio": "audio.wav"}, {"text": f" 3 1 4 {dm.EOS}"},
    ]}  # fmt: skip


def _batch(cfg, root) -> dict:
    """One row [1, T] from the record pipeline, positions offset, Engram rows hashed with spans dead."""
    model = cfg.model
    dm.build_tokenizer(model, root / "tokenizer.json")
    encoder = RecordEncoder(model, Tokenizer.from_file(root / "tokenizer.json"))
    rec = encoder.encode(_record_files(root), root, "article:1")
    row = collate_row([rec], T, MediaBudget.fitting(model, [rec], at_least=1), pad_id=1)
    batch = {k: v[None] for k, v in row.items()}
    batch["positions"] = np.where(batch["segment_ids"] > 0, batch["positions"] + POSITION_OFFSET, 0).astype(np.int32)
    cmap_V = np.arange(model.vocab_size)  # identity fold: compressed_vocab_size = vocab_size in tiny_article
    batch["engram_rows"] = hash_rows(engram_layout(model.engram), cmap_V, batch["tokens"], batch["segment_ids"],
                                     batch["media_slots"] >= 0)
    return batch


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    cfg = load_config([TINY, ROOT / "configs/mesh/single.yaml"], [f"data.seq_len={T}", "data.global_batch_size=1"])
    batch = _batch(cfg, tmp_path_factory.mktemp("media"))
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    state = jax.device_get(p.init_state())
    # the gradients and counts exactly as train_step takes them (train.loss_fn)
    grad_fn = jax.jit(jax.grad(lambda prm, rtr, b: loss_fn(prm, rtr, b, p.model, cfg), has_aux=True))
    grads, (terms, counts) = grad_fn(state.params, state.router, batch)
    # the bias update as train_step makes it (train.update_biases on the step's counts)
    router = update_biases(state.router, counts, cfg.train.bias_update_rate, router_bias_rows(cfg.model))

    @jax.jit
    def picks(params, router, b):  # the indexer's top-k per DSA layer, as the loss calls the model
        _, inter = p.model.apply({"params": params, "router": router}, b["tokens"], b["positions"],
                                 b["segment_ids"], return_logits=False, engram_rows=b["engram_rows"],
                                 media=media_from_batch(b), mutable=["intermediates"])
        return inter["intermediates"]

    inter = picks(state.params, state.router, batch)
    return cfg, batch, state, jax.device_get((grads, terms, router, inter))


@pytest.mark.slow
def test_record_is_long_enough_for_every_part(step_run):
    """The row exercises what the other tests rely on: all three media kinds, a record longer than
    index_topk, positions past original_seq_len with YaRN on."""
    cfg, batch, *_ = step_run
    m = cfg.model
    slots, seg = batch["media_slots"][0], batch["segment_ids"][0]
    assert {m.vision.image_token_id, m.video.video_token_id, m.audio.audio_token_id} <= set(batch["tokens"][0].tolist())
    assert (batch["mel_len"] > 0).any() and (batch["patch_pic"] >= 0).sum() == 16 + 4 * 16  # image + 4 frames
    n = int((seg > 0).sum())
    assert n > m.index.index_topk, (n, m.index.index_topk)
    assert m.rope.yarn and batch["positions"][0, n - 1] >= m.rope.original_seq_len
    assert batch["loss_mask"].sum() > 0 and (slots >= 0).sum() > 0


@pytest.mark.slow
def test_every_parameter_gets_a_gradient(step_run):
    _, _, state, (grads, terms, *_) = step_run
    assert np.isfinite(float(terms["ce"])) and np.isfinite(float(terms["mtp"])) and float(terms["index"]) > 0
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(state.params))
    nonfinite = [jax.tree_util.keystr(k) for k, g in leaves if not np.isfinite(g).all()]
    zero = [jax.tree_util.keystr(k) for k, g in leaves if not np.any(g)]
    assert not nonfinite, f"non-finite gradients: {nonfinite}"
    assert not zero, f"all-zero gradients ({len(zero)} of {len(leaves)} leaves): {zero}"
    # the parts the article names are among the leaves checked
    names = " ".join(jax.tree_util.keystr(k) for k, _ in leaves)
    for part in ("indexer", "engram", "vision", "aligner", "audio", "image_start", "video_frame", "audio_end",
                 "mtp_0", "w_router"):
        assert part in names, part


@pytest.mark.slow
def test_dsa_selection_leaves_visible_keys_out(step_run):
    """In every DSA layer the queries past index_topk in the record pick index_topk distinct keys, all
    visible (same record, not in the future): strictly fewer than they could see."""
    cfg, batch, _, (*_, inter) = step_run
    K = cfg.model.index.index_topk
    n = int((batch["segment_ids"][0] > 0).sum())
    found = []

    def walk(node, path):
        for key, val in node.items():
            if key == "index_topk_BTU":
                found.append((path, np.asarray(val[0])))
            elif isinstance(val, dict):
                walk(val, f"{path}/{key}")

    walk(inter, "")
    assert found, "no indexer sowed its picks"
    n_layers = 0
    for path, picks in found:  # [B, T, U], or [L, B, T, U] for a scanned segment
        picks = picks.reshape(-1, *picks.shape[-3:])
        n_layers += picks.shape[0]
        end = n - 1 if path.startswith("/mtp_") else n  # MTP depth 1 runs on the documents shifted by one
        assert end > K
        for t in range(K, end):
            got = picks[:, 0, t]
            for layer in got:
                chosen = set(layer[layer >= 0].tolist())
                assert len(chosen) == K and max(chosen) <= t, (path, t, sorted(chosen))
    assert n_layers == cfg.model.n_layers + cfg.model.num_nextn_predict_layers, n_layers


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.slow
def test_both_router_biases_move(step_run):
    """After the bias update every listed bias row (text `bias` and media-span `bias_vl`) has moved;
    MTP's bias_vl, which no span reaches, has not (models.router_bias_rows)."""
    cfg, _, before, (*_, after, _) = step_run
    rows = router_bias_rows(cfg.model)
    assert {r.path[-1] for r in rows} == {"bias", "bias_vl"}
    still = [r.path for r in rows if np.array_equal(_get(before.router, r.path), _get(after, r.path))]
    assert not still, f"router biases that did not move: {still}"
    mtp_vl = ("mtp_0", "block", "ffn", "bias_vl")
    np.testing.assert_array_equal(_get(before.router, mtp_vl), _get(after, mtp_vl))
