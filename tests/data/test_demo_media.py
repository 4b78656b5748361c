"""The embedded multimodal demo's synthesis (data/demo_media.py): determinism, disjoint splits, the
tones' frequencies, the motion, the tokenizer, and errors."""

import dataclasses
import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_jax.config import load_model_config
from deepseek_jax.data import demo_media as dm
from deepseek_jax.tokenizer import DataError, Tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = dm.DemoSpec(train_per_task=8, val_per_task=5, val_digit_rows=40, val_sequences=20)


@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config([CONFIGS / "model/tiny_multimodal.yaml"])


@pytest.fixture(scope="module")
def demo(model_cfg, tmp_path_factory):
    return dm.demo_records(model_cfg, tmp_path_factory.mktemp("cache"), SMALL)


def _records(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_records(demo, model_cfg):
    assert {p.name for p in demo.iterdir()} >= {"train.jsonl", "validation.jsonl", "tokenizer.json", "spec.json"}
    for split, n in (("train", SMALL.train_per_task), ("validation", SMALL.val_per_task)):
        records = _records(demo, split)
        assert sorted(r["tag"] for r in records) == sorted(list(model_cfg.media_token_ids()) * n)
        for r in records:
            prompt, media, answer = r["segments"]
            assert prompt == {"text": dm.PROMPTS[r["tag"]], "loss": False}
            assert (demo / media[r["tag"]]).is_file()
            assert answer["text"].startswith(" ") and answer["text"].endswith(" " + dm.EOS)
            words = answer["text"].split()[:-1]
            assert len(words) == {"image": 1, "audio": SMALL.audio_digits, "video": 1}[r["tag"]]


def test_deterministic_and_cached(demo, model_cfg, tmp_path):
    again = dm.demo_records(model_cfg, tmp_path, SMALL)
    assert again.name == demo.name and _digest(again) == _digest(demo)
    assert dm.demo_records(model_cfg, tmp_path, SMALL) == again  # cached: same folder, not rewritten
    other = dm.demo_records(model_cfg, tmp_path, dataclasses.replace(SMALL, seed=1))
    assert other != again and _digest(other) != _digest(again)


def test_splits_disjoint(demo):
    train_rows, val_rows, train_seqs, val_seqs = dm._splits(SMALL, 1797)
    assert not set(train_rows) & set(val_rows) and len(set(train_rows) | set(val_rows)) == 1797
    assert not set(train_seqs) & set(val_seqs) and len(set(train_seqs) | set(val_seqs)) == 1000
    spec = json.loads((demo / "spec.json").read_text())
    assert spec["val_digit_rows"] == [int(r) for r in val_rows]
    played = {split: {int("".join(r["segments"][2]["text"].split()[:-1])) for r in _records(demo, split)
                      if r["tag"] == "audio"} for split in ("train", "validation")}
    assert played["validation"] <= set(val_seqs) and not played["train"] & set(val_seqs)


def test_images_are_their_digit_rows(demo):
    """Each validation image, shrunk back to 8×8, is nearest (over the ±1 px shifts) to a held-out
    row of its own label; a swapped label or split would fail."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    val_rows = json.loads((demo / "spec.json").read_text())["val_digit_rows"]
    for r in (r for r in _records(demo, "validation") if r["tag"] == "image"):
        img = np.asarray(Image.open(demo / r["segments"][1]["image"]), np.float64)
        assert img.shape == (16, 16)
        dist = [min(np.abs(np.roll(np.kron(digits.images[row], np.ones((2, 2))), s, (0, 1)) / 16
                           - img / img.max()).sum() for s in [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)])
                for row in val_rows]
        assert str(digits.target[val_rows[int(np.argmin(dist))]]) == r["segments"][2]["text"].split()[0]


@pytest.mark.parametrize("digit", range(10))
def test_dtmf_tone_peaks(digit):
    """The two strongest FFT peaks of a noiseless one-digit clip are its key's pair (±1.5% jitter + one bin)."""
    sr = 8000
    wave_N = dm.dtmf_clip([digit], np.random.default_rng(digit), sr, 0.2, noise=False).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(wave_N * np.hanning(len(wave_N)), n=8 * len(wave_N)))
    freqs = np.fft.rfftfreq(8 * len(wave_N), 1 / sr)
    low, high = dm.dtmf_frequencies(digit)
    got_low = freqs[np.argmax(np.where(freqs < 1100, spectrum, 0))]
    got_high = freqs[np.argmax(np.where(freqs >= 1100, spectrum, 0))]
    bin_hz = sr / len(wave_N)
    assert abs(got_low - low) <= 0.015 * low + bin_hz and abs(got_high - high) <= 0.015 * high + bin_hz
    quiet = (freqs > 200) & ((np.abs(freqs - low) > 60) & (np.abs(freqs - high) > 60))
    assert spectrum[quiet].max() < 0.1 * spectrum.max()  # nothing else is loud


def test_dtmf_tones_in_order(demo):
    """A written clip: 16-bit mono at the model's rate; its tones, read in 20 ms windows above the noise,
    are the answer's digits in order."""
    r = next(r for r in _records(demo, "validation") if r["tag"] == "audio")
    with wave.open(str(demo / r["segments"][1]["audio"])) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767
    assert len(x) == int(0.6 * 8000)
    win, heard = 160, []
    pairs = {dm.dtmf_frequencies(d): d for d in range(10)}
    for i in range(0, len(x) - win, win):
        seg = x[i:i + win] * np.hanning(win)
        spec = np.abs(np.fft.rfft(seg, 8 * win))
        if spec.max() < 5:  # silence / noise only
            continue
        f = np.fft.rfftfreq(8 * win, 1 / 8000)
        lo, hi = (f[np.argmax(np.where(band, spec, 0))] for band in (f < 1100, f >= 1100))
        key = min(pairs, key=lambda p: abs(p[0] - lo) + abs(p[1] - hi))
        if not heard or heard[-1][1] != key or i - heard[-1][0] > win:
            heard.append([i, key])
        heard[-1][0] = i
    assert [str(pairs[k]) for _, k in heard] == r["segments"][2]["text"].split()[:-1]


@pytest.mark.parametrize("direction", sorted(dm.DIRECTIONS))
def test_motion(direction):
    frames = dm.motion_frames(np.full((8, 8), 16.0), direction, np.random.default_rng(3), 24, 4, (3, 4))
    assert frames.shape == (4, 24, 24) and frames.dtype == np.uint8
    centres = np.array([np.argwhere(f > 100).mean(0) for f in frames])
    steps = np.diff(centres, axis=0)
    dy, dx = dm.DIRECTIONS[direction]
    np.testing.assert_allclose(steps / np.abs(steps).max(), np.broadcast_to([dy, dx], steps.shape), atol=1e-9)
    assert np.abs(steps).max() in (3, 4)


def test_gif_round_trip(tmp_path):
    frames = dm.motion_frames(np.full((8, 8), 16.0), "left", np.random.default_rng(0), 16, 4)
    dm.write_gif(tmp_path / "clip.gif", frames, 2.0)
    with Image.open(tmp_path / "clip.gif") as im:
        assert im.n_frames == 4
        for i in range(4):
            im.seek(i)
            assert im.info["duration"] == 500
            np.testing.assert_array_equal(np.asarray(im.convert("L")), frames[i])


def test_tokenizer(demo, model_cfg):
    tok = Tokenizer.from_file(demo / "tokenizer.json")
    assert tok.vocab_size == model_cfg.vocab_size and tok.eos_id == 0 and tok.pad_id == 1
    vocab = tok._tok.get_vocab()
    assert vocab["<image>"] == model_cfg.vision.image_token_id
    assert vocab["<audio>"] == model_cfg.audio.audio_token_id
    assert vocab["<video>"] == model_cfg.video.video_token_id
    ids = tok.encode(" 3 1 4 " + dm.EOS)
    assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == "3 1 4"
    for r in _records(demo, "train"):  # no record word is unknown
        for seg in r["segments"]:
            if "text" in seg:
                assert vocab[dm.UNK] not in tok.encode(seg["text"])


def test_errors(model_cfg, tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        dm.build_tokenizer(dataclasses.replace(model_cfg, vocab_size=20, vision=None, video=None, audio=None),
                           tmp_path / "t.json")
    bare = dataclasses.replace(model_cfg, vision=None, video=None, audio=None)
    with pytest.raises(DataError, match="model.vision, model.audio or model.video"):
        dm.demo_records(bare, tmp_path)
    short = dataclasses.replace(model_cfg, audio=dataclasses.replace(model_cfg.audio, max_seconds=0.3))
    with pytest.raises(DataError, match="max_seconds"):
        dm.demo_records(short, tmp_path)
    with pytest.raises(DataError, match="do not fit"):
        dm.dtmf_clip([1, 2, 3], np.random.default_rng(0), 8000, 0.2)


def test_only_the_models_modalities(model_cfg, tmp_path):
    vision_only = dataclasses.replace(model_cfg, video=None, audio=None)
    folder = dm.demo_records(vision_only, tmp_path, SMALL)
    assert {r["tag"] for r in _records(folder, "train")} == {"image"}
    assert not (folder / "audio").exists()


@pytest.fixture
def small_default(monkeypatch, tmp_path):
    """`source: demo_media` writes the small spec into tmp_path (not the user's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dm, "DEFAULT_SPEC", SMALL)
    return tmp_path


def test_source_keyword_and_tokenizer(small_default):
    from deepseek_jax.config import load_config
    from deepseek_jax.data import list_records, load_tokenizer

    cfg = load_config([CONFIGS / "train/tiny_multimodal.yaml"], [f"train.run_dir={small_default / 'run'}"])
    tok = load_tokenizer(cfg.data, cfg.train.run_dir, cfg.model.vocab_size, cfg.model)
    folder = tok.path.parent
    assert folder.parent == small_default / "xdg" / "deepseek_jax" and folder.name.startswith("demo_media_")
    assert len(list_records(cfg.data, "train", cfg.model)) == 3 * SMALL.train_per_task
    assert len(list_records(cfg.data, "validation", cfg.model)) == 3 * SMALL.val_per_task


@pytest.mark.slow
def test_smoke_run(small_default):
    """`deepseek-jax train configs/train/tiny_multimodal.yaml` end to end, 2 steps: batches from the
    demo records, a train step, the held-out loss and the per-task exact-match accuracies."""
    from deepseek_jax.config import load_config
    from deepseek_jax.run import run

    cfg = load_config([CONFIGS / "train/tiny_multimodal.yaml"],
                      [f"train.run_dir={small_default / 'run'}", "train.steps=2", "train.log_every=1",
                       "train.eval_batches=1", "data.global_batch_size=4"])
    out = run(cfg)
    assert out["stopped_by"] is None and int(out["state"].step) == 2
    acc = {k: v for k, v in out["eval"].items() if k.startswith("accuracy/")}
    assert set(acc) == {"accuracy/image", "accuracy/audio", "accuracy/video"}
    assert all(0 <= v <= 1 for v in acc.values()) and np.isfinite(out["eval"]["loss"])
