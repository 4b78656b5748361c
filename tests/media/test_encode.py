"""Records -> model inputs (deepseek_jax/media/encode.py): encoding of interleaved records (text, image,
audio, video), one packed row checked against the shared contract (stated here from the slot codes
alone: IMAGE rows in reading order, unshuffle windows, AUDIO rows M + a·n_tok(F) + j, FRAME numbers),
budgets, and errors that name the record and the segment."""

import base64
import dataclasses
import pickle

import numpy as np
import pytest
from PIL import Image

from deepseek_jax.config import AudioConfig, VideoConfig, VisionConfig, load_model_config
from deepseek_jax.media import (
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    FRAME,
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    NEWLINE,
    TEXT,
    VIDEO_END,
    VIDEO_START,
)
from deepseek_jax.media.audio import load_wav, log_mel
from deepseek_jax.media.encode import MediaBudget, RecordEncoder, collate_row, record_cost
from deepseek_jax.media.image import load_image, preprocess_image
from deepseek_jax.tokenizer import DataError, Tokenizer
from tests.utils import CONFIGS, wav_bytes, whitespace_words

WORDS = ["which", "digit", "?", "three", "hear", "this", "a", "b", "watch", "left"]
IMG, VID, AUD = 61, 62, 63


@pytest.fixture(scope="module")
def model_cfg():
    cfg = load_model_config([CONFIGS / "model" / "tiny.yaml"])
    return dataclasses.replace(
        cfg, vocab_size=64,
        vision=VisionConfig(hidden_size=32, num_heads=2, intermediate_size=32, num_layers=2, patch_size=2,
                            downsample_ratio=3, min_pixels=64, max_image_tokens=32, image_token_id=IMG),
        video=VideoConfig(video_token_id=VID, fps=2.0, max_frames=4, frame_max_tokens=8),
        audio=AudioConfig(audio_token_id=AUD, sample_rate=8000, n_fft=200, hop_length=80, n_mels=16, fmin=100.0,
                          fmax=4000.0, max_seconds=1.0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}, "IMG": IMG}
    tok = whitespace_words(vocab)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


def _wav(seconds: float, rate: int = 8000, freq: float = 700.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return wav_bytes((0.4 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2"), rate)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(root / "imgs" / "3.png")
    (root / "a.wav").write_bytes(_wav(0.3))
    frames = [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "v.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    for i, f in enumerate(frames):
        f.save(root / f"f{i}.png")
    return root


def _records():
    image_rec = {"segments": [{"text": "which digit ?", "loss": False}, {"image": "imgs/3.png"}, {"text": "three"}]}
    mixed = {"tag": "mix", "segments": [
        {"text": "hear this", "loss": False}, {"audio": "a.wav"}, {"text": "a b"}, {"video": "v.gif"},
        {"text": "left"}, {"image": "imgs/3.png"}]}
    return image_rec, mixed


def test_encode_an_image_record(model_cfg, tokenizer, media):
    rec = RecordEncoder(model_cfg, tokenizer).encode(_records()[0], media, "train.jsonl:1")
    prompt, answer = tokenizer.encode("which digit ?"), tokenizer.encode("three")
    patches, grid = preprocess_image(load_image(media / "imgs" / "3.png", "x"), model_cfg.vision)
    n_h, n_w = -(-grid[0] // 3), -(-grid[1] // 3)
    span = [IMAGE_START] + ([IMAGE] * n_w + [NEWLINE]) * n_h + [IMAGE_END]
    assert rec.tokens.tolist() == prompt + [IMG] * len(span) + answer + [tokenizer.eos_id]
    assert rec.slots.tolist() == [TEXT] * len(prompt) + span + [TEXT] * (len(answer) + 1)
    assert rec.loss.tolist() == [0.0] * (len(prompt) + len(span)) + [1.0] * (len(answer) + 1)
    assert len(rec.pictures) == 1 and rec.pictures[0][1] == grid and np.array_equal(rec.pictures[0][0], patches)
    image = rec.slots == IMAGE
    assert rec.ref[image].tolist() == [[0, m] for m in range(n_h * n_w)]
    assert np.all(rec.ref[~image] == -1) and rec.name == "train.jsonl:1" and rec.tag is None
    assert (rec.tokens.dtype, rec.slots.dtype, rec.loss.dtype, rec.ref.dtype) == (np.int32, np.int32,
                                                                                  np.float32, np.int32)


def test_encode_audio_and_video(model_cfg, tokenizer, media):
    rec = RecordEncoder(model_cfg, tokenizer).encode(_records()[1], media, "train.jsonl:2")
    audio = model_cfg.audio
    clip = log_mel(load_wav(media / "a.wav", "x", audio.sample_rate), audio)
    assert rec.tag == "mix" and len(rec.clips) == 1 and np.array_equal(rec.clips[0], clip)
    n_tok = audio.n_tokens(clip.shape[0])  # 0.3 s at hop 80: 31 frames -> 8 tokens
    a0 = int(np.flatnonzero(rec.slots == AUDIO_START)[0])
    assert rec.slots[a0:a0 + n_tok + 2].tolist() == [AUDIO_START] + [AUDIO] * n_tok + [AUDIO_END]
    assert rec.ref[a0 + 1:a0 + 1 + n_tok].tolist() == [[0, j] for j in range(n_tok)]
    assert np.all(rec.tokens[a0:a0 + n_tok + 2] == AUD)
    # 3 GIF frames of 0.5 s at 2 fps: every frame; then the image: 4 pictures in all
    assert len(rec.pictures) == 4 and (rec.slots == FRAME).sum() == 3
    v0, v1 = np.flatnonzero(rec.slots == VIDEO_START)[0], np.flatnonzero(rec.slots == VIDEO_END)[0]
    assert np.all(rec.tokens[v0:v1 + 1] == VID)
    n_h, n_w = -(-rec.pictures[0][1][0] // 3), -(-rec.pictures[0][1][1] // 3)
    frame = [FRAME] + ([IMAGE] * n_w + [NEWLINE]) * n_h
    assert rec.slots[v0:v1 + 1].tolist() == [VIDEO_START] + frame * 3 + [VIDEO_END]
    assert rec.ref[rec.slots == FRAME].tolist() == [[0, 0], [1, 1], [2, 2]]
    # the trailing image: no loss on the appended end-of-text
    assert rec.slots[-1] == TEXT and rec.tokens[-1] == tokenizer.eos_id and rec.loss[-1] == 0
    assert rec.loss[rec.slots != TEXT].sum() == 0


def test_bytes_b64_and_frame_lists(model_cfg, tokenizer, media):
    enc = RecordEncoder(model_cfg, tokenizer)
    b64 = {k: {"bytes_b64": base64.b64encode((media / f).read_bytes()).decode()}
           for k, f in [("image", "imgs/3.png"), ("audio", "a.wav"), ("video", "v.gif")]}
    by_path = enc.encode(_records()[1], media, "p")
    segs = [{"text": "hear this", "loss": False}, {"audio": b64["audio"]}, {"text": "a b"},
            {"video": b64["video"]}, {"text": "left"}, {"image": b64["image"]}]
    by_bytes = enc.encode({"tag": "mix", "segments": segs}, media, "b")
    segs[3] = {"video": ["f0.png", "f1.png", "f2.png"]}
    by_list = enc.encode({"segments": segs}, media, "l")
    for other in (by_bytes, by_list):
        assert np.array_equal(other.tokens, by_path.tokens) and np.array_equal(other.slots, by_path.slots)
        assert np.array_equal(other.ref, by_path.ref)
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(other.pictures, by_path.pictures))
    # the GIF round trip goes through a palette; the PNG frames do not: only the grids must agree
    assert [g for _, g in by_list.pictures] == [g for _, g in by_path.pictures]


def test_end_of_text_is_not_doubled(model_cfg, tokenizer, media):
    rec = RecordEncoder(model_cfg, tokenizer).encode({"segments": [{"text": "a b <|endoftext|>"}]}, media, "r")
    assert rec.tokens.tolist() == tokenizer.encode("a b") + [tokenizer.eos_id] and rec.loss.tolist() == [1, 1, 1]
    no_eos = RecordEncoder(model_cfg, tokenizer, append_eos=False).encode({"segments": [{"text": "a"}]}, media, "r")
    assert no_eos.tokens.tolist() == tokenizer.encode("a")


def _budget(model_cfg, **kw):
    return MediaBudget.for_model(model_cfg, **{"max_patches": 200, "max_image_rows": 40, "max_audio_clips": 2,
                                               "max_audio_frames": 50, **kw})


def test_collate_row_follows_the_contract(model_cfg, tokenizer, media):
    enc = RecordEncoder(model_cfg, tokenizer)
    recs = [enc.encode(r, media, f"train.jsonl:{i}") for i, r in enumerate(_records(), 1)]
    budgets, T = _budget(model_cfg), 150
    row = collate_row(recs, T, budgets, pad_id=tokenizer.pad_id)
    n1, n = len(recs[0].tokens), sum(len(r.tokens) for r in recs)
    slots, rows = row["media_slots"], row["media_rows"]
    assert row["segment_ids"].tolist() == [1] * n1 + [2] * (n - n1) + [0] * (T - n)
    assert row["positions"].tolist() == list(range(n1)) + list(range(n - n1)) + [0] * (T - n)
    assert np.all(row["tokens"][n:] == tokenizer.pad_id) and np.all(slots[n:] == TEXT)
    loss = np.concatenate([r.loss for r in recs] + [np.zeros(T - n)])
    seg = row["segment_ids"]
    want_mask = (seg[:-1] == seg[1:]) & (seg[1:] > 0) & (slots[1:] == TEXT) & (loss[1:] == 1)
    assert row["loss_mask"].tolist() == want_mask.tolist() + [0.0]
    # IMAGE rows: pictures in order, each in reading order -> 0, 1, 2, ... over the row
    image_t = np.flatnonzero(slots == IMAGE)
    assert rows[image_t].tolist() == list(range(len(image_t)))
    _check_windows(row, recs, model_cfg.vision.downsample_ratio)
    # AUDIO rows: M + a·n_tok(F) + j; FRAME rows: the frame number
    n_tok_F = model_cfg.audio.n_tokens(budgets.max_audio_frames)
    audio_t = np.flatnonzero(slots == AUDIO)
    assert rows[audio_t].tolist() == [budgets.max_image_rows + j for j in range(len(audio_t))]
    assert n_tok_F >= len(audio_t)
    assert rows[slots == FRAME].tolist() == [0, 1, 2]
    assert np.all(rows[(slots != IMAGE) & (slots != AUDIO) & (slots != FRAME)] == 0)
    clip = recs[1].clips[0]
    assert row["mel"].shape == (2, 50, 16) and row["mel_len"].tolist() == [len(clip), 0]
    assert np.array_equal(row["mel"][0, :len(clip)], clip) and not row["mel"][0, len(clip):].any()
    assert not row["mel"][1].any()
    want_dtypes = {"patches": np.float32, "mel": np.float32, "loss_mask": np.float32}
    assert all(v.dtype == want_dtypes.get(k, np.int32) for k, v in row.items())


def _check_windows(row, recs, r):
    """Every IMAGE slot's aligner row gathers the r×r window under its grid cell, from its own picture."""
    pictures = [p for rec in recs for p in rec.pictures]
    slots, rows = row["media_slots"], row["media_rows"]
    pic, cell = -1, None
    for t, s in enumerate(slots):
        if s in (IMAGE_START, FRAME):
            pic, cell = pic + 1, [0, 0]
        elif s == NEWLINE:
            cell = [cell[0] + 1, 0]
        elif s == IMAGE:
            (h, w), window = pictures[pic][1], row["unshuffle"][rows[t]]
            for k, p in enumerate(window):
                y, x = cell[0] * r + k // r, cell[1] * r + k % r
                if y >= h or x >= w:
                    assert p == -1
                    continue
                assert row["patch_pic"][p] == pic and row["patch_pos"][p].tolist() == [y, x]
                assert np.array_equal(row["patches"][p], pictures[pic][0][y * w + x])
            cell[1] += 1
    n_rows = int((slots == IMAGE).sum())
    assert np.all(row["unshuffle"][n_rows:] == -1)
    n_patches = sum(p.shape[0] for p, _ in pictures)
    assert np.all(row["patch_pic"][n_patches:] == -1) and not row["patches"][n_patches:].any()


def test_budgets_and_costs(model_cfg, tokenizer, media):
    enc = RecordEncoder(model_cfg, tokenizer)
    a, b = (enc.encode(r, media, f"train.jsonl:{i}") for i, r in enumerate(_records(), 1))
    tokens, patches, rows, clips, frames = record_cost(b)
    assert (tokens, clips, frames) == (len(b.tokens), 1, b.clips[0].shape[0])
    assert patches == sum(p.shape[0] for p, _ in b.pictures) and rows == int((b.slots == IMAGE).sum())
    with pytest.raises(DataError, match="train.jsonl:2: .* tokens .* budget of 20"):
        collate_row([b], 20, _budget(model_cfg))
    with pytest.raises(DataError, match="train.jsonl:2: .* ViT patches"):
        collate_row([b], 150, _budget(model_cfg, max_patches=patches - 1))
    with pytest.raises(DataError, match="train.jsonl:2: .* log-mel frames"):
        collate_row([b], 150, _budget(model_cfg, max_audio_frames=frames - 1))
    with pytest.raises(DataError, match=r"records \['train.jsonl:1', 'train.jsonl:2'\]"):
        collate_row([a, b], 150, _budget(model_cfg, max_image_rows=rows))
    text_only = MediaBudget(max_patches=0, max_image_rows=0, max_audio_clips=0, max_audio_frames=0, vision=None,
                            audio=None)
    only = enc.encode({"segments": [{"text": "a b"}]}, media, "t")
    assert set(collate_row([only], 8, text_only)) == {"tokens", "positions", "segment_ids", "loss_mask",
                                                       "media_slots", "media_rows"}
    with pytest.raises(DataError, match="train.jsonl:1: .* no vision config"):
        collate_row([a], 150, dataclasses.replace(text_only, max_patches=500, max_image_rows=50))
    empty = collate_row([], 8, _budget(model_cfg), pad_id=1)
    assert np.all(empty["tokens"] == 1) and not empty["segment_ids"].any() and np.all(empty["patch_pic"] == -1)


@pytest.mark.parametrize("segment, what", [
    ({"txt": "a"}, "exactly one of"),
    ({"text": "a", "image": "imgs/3.png"}, "exactly one of"),
    ({"image": "imgs/3.png", "loss": True}, "exactly one of"),
    ({"text": 3}, "must be a string"),
    ({"text": "a", "loss": "yes"}, "boolean"),
    ({"text": "IMG a"}, "placeholder id"),
    ({"image": "imgs/none.png"}, "does not exist"),
    ({"image": "a.wav"}, "cannot decode"),
    ({"image": {"bytes_b64": "!!!"}}, "not valid base64"),
    ({"image": {"path": "x"}}, "bytes_b64"),
    ({"image": 5}, "expected a path"),
    ({"audio": "imgs/3.png"}, "cannot decode"),
    ({"audio": "long.wav"}, "max_seconds"),
    ({"video": "imgs/3.png"}, "not a GIF"),
    ({"video": ["imgs/3.png", "none.png"]}, "frame 1"),
    ("text", "must be an object"),
])
def test_errors_name_the_record_and_segment(model_cfg, tokenizer, media, segment, what):
    (media / "long.wav").write_bytes(_wav(1.5))
    record = {"segments": [{"text": "a"}, segment]}
    with pytest.raises(DataError, match=f"train.jsonl:17 segment 1.*{what}"):
        RecordEncoder(model_cfg, tokenizer).encode(record, media, "train.jsonl:17")


def test_record_level_errors_and_missing_modalities(model_cfg, tokenizer, media):
    enc = RecordEncoder(model_cfg, tokenizer)
    for bad in [[], {"segments": []}, {"text": "a"}, {"segments": [{"text": "a"}], "tag": 3}]:
        with pytest.raises(DataError, match="train.jsonl:9"):
            enc.encode(bad, media, "train.jsonl:9")
    no_audio = RecordEncoder(dataclasses.replace(model_cfg, audio=None), tokenizer)
    with pytest.raises(DataError, match="train.jsonl:9 segment 0: an audio segment, but the model has no `audio`"):
        no_audio.encode({"segments": [{"audio": "a.wav"}]}, media, "train.jsonl:9")
    no_vision = RecordEncoder(dataclasses.replace(model_cfg, vision=None, video=None), tokenizer)
    with pytest.raises(DataError, match="no `vision` config"):
        no_vision.encode({"segments": [{"image": "imgs/3.png"}]}, media, "train.jsonl:9")


def test_encoder_pickles(model_cfg, tokenizer, media):
    enc = RecordEncoder(model_cfg, tokenizer)
    again = pickle.loads(pickle.dumps(enc))
    a, b = enc.encode(_records()[1], media, "r"), again.encode(_records()[1], media, "r")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.clips[0], b.clips[0])
    rec = pickle.loads(pickle.dumps(a))
    assert np.array_equal(rec.ref, a.ref) and len(rec.pictures) == len(a.pictures)
