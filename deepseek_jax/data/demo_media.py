"""The embedded multimodal demo: three small tasks, synthesised offline, as interleaved records.

    image  "which digit ?"  <16×16 grey PNG: a scikit-learn digit, 8×8 upscaled ×2>   " 3 <|endoftext|>"
    audio  "which tones ?"  <0.6 s WAV: three DTMF-style dual tones>                 " 3 1 4 <|endoftext|>"
    video  "which way ?"    <4-frame GIF: an 8×8 digit moving 2 px a frame on 16×16>  " left <|endoftext|>"

Nothing is downloaded: the digits are scikit-learn's bundled `load_digits()` (1,797 rows of 8×8, values
0–16); tones and motion are synthesised from a fixed seed. Held-out records never share a source with
training ones: validation images and video sprites come from digit rows no training record uses, and
validation tone sequences are 3-digit numbers no training clip plays (so audio accuracy measures
reading each tone, not remembering sequences). Only the modalities the model has (model.vision,
model.audio, model.video) are written.

`demo_records(model_cfg, cache_dir)` writes, once per spec and model ids, a folder

    train.jsonl, validation.jsonl   one record a line: {"tag": ..., "segments": [...]} (the shared
                                    record contract; media paths relative to the folder)
    image/ audio/ video/            the media files
    tokenizer.json                  a WordLevel tokenizer (whitespace-split words; see `build_tokenizer`)
    spec.json                       what was synthesised (DemoSpec, the model ids, the fingerprint)

and returns its path; the name carries a fingerprint of everything that shapes the content, and the
folder appears atomically, so concurrent callers and reruns share one copy.

Audio: DTMF pairs (low 697/770/852/941 Hz, high 1209/1336/1477 Hz) of 70–110 ms, gaps 40–70 ms, onset
10–50 ms, ±1.5% pitch jitter per tone (the telephone tolerance), amplitudes 0.2–0.4 each, 5 ms raised-
cosine ramps, white noise of std 0.005–0.03, 16-bit PCM at model.audio.sample_rate.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np
import tokenizers
from PIL import Image

from deepseek_jax.config import ModelConfig
from deepseek_jax.tokenizer import EOS_TOKENS, PAD_TOKENS, DataError

VERSION = 2  # bump when the synthesis changes: it is part of the folder's fingerprint
EOS, PAD, UNK = EOS_TOKENS[0], PAD_TOKENS[0], "<unk>"
PROMPTS = {"image": "which digit ?", "audio": "which tones ?", "video": "which way ?"}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
DTMF_LOW, DTMF_HIGH = (697.0, 770.0, 852.0, 941.0), (1209.0, 1336.0, 1477.0)
# digit -> (row, column) of the telephone keypad: 1 2 3 / 4 5 6 / 7 8 9 / * 0 #
DTMF_KEYS = {d: ((d - 1) // 3, (d - 1) % 3) for d in range(1, 10)} | {0: (3, 1)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSpec:
    """How much of each task is synthesised (the defaults are the demo's; tests pass smaller ones)."""

    train_per_task: int = 4000  # training records per modality
    val_per_task: int = 300  # held-out records per modality
    val_digit_rows: int = 300  # scikit-learn rows held out (validation images and video sprites)
    val_sequences: int = 100  # 3-digit tone sequences held out (of the 1,000)
    audio_digits: int = 3  # tones per clip
    audio_seconds: float = 0.6  # clip length (the tones fit with room to spare)
    image_scale: int = 2  # 8×8 digit -> 16×16 image
    canvas: int = 16  # video frame side
    frames: int = 4  # video frames per clip
    video_steps: tuple[int, ...] = (2,)  # pixels a frame the sprite moves (one drawn per clip)
    seed: int = 0


DEFAULT_SPEC = DemoSpec()


def dtmf_frequencies(digit: int) -> tuple[float, float]:
    """The (low, high) pair of a telephone key."""
    row, col = DTMF_KEYS[digit]
    return DTMF_LOW[row], DTMF_HIGH[col]


def dtmf_clip(digits, rng: np.random.Generator, sample_rate: int, seconds: float, noise: bool = True):
    """float32 wave of `digits` as dual tones with random timing, pitch, level and noise (docstring)."""
    n = int(round(seconds * sample_rate))
    wave_N = rng.normal(0.0, rng.uniform(0.005, 0.03), n) if noise else np.zeros(n)
    start = rng.uniform(0.01, 0.05)
    for d in digits:
        dur = rng.uniform(0.07, 0.11)
        freqs = np.array(dtmf_frequencies(int(d))) * (1 + rng.uniform(-0.015, 0.015, 2))
        amps, phases = rng.uniform(0.2, 0.4, 2), rng.uniform(0, 2 * np.pi, 2)
        i0, k = int(start * sample_rate), int(dur * sample_rate)
        if i0 + k > n:
            raise DataError(f"demo audio: {len(digits)} tones do not fit in {seconds} s")
        t = np.arange(k) / sample_rate
        tone = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in zip(amps, freqs, phases))
        ramp = min(k // 2, int(0.005 * sample_rate))
        env = np.ones(k)
        env[:ramp] = env[k - ramp:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        wave_N[i0:i0 + k] += tone * env
        start += dur + rng.uniform(0.04, 0.07)
    return np.clip(wave_N, -1, 1).astype(np.float32)


def digit_image(pixels_88: np.ndarray, rng: np.random.Generator, scale: int) -> np.ndarray:
    """uint8 [8·scale, 8·scale]: the digit upscaled (nearest), shifted by up to one pixel, dimmed
    by up to 25%, with a little noise."""
    img = np.kron(pixels_88 / 16.0, np.ones((scale, scale))) * 255 * rng.uniform(0.75, 1.0)
    dy, dx = rng.integers(-1, 2, 2)
    img = np.roll(np.pad(img, 1), (dy, dx), axis=(0, 1))[1:-1, 1:-1]  # pad first: no wrap-around
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def motion_frames(pixels_88: np.ndarray, direction: str, rng: np.random.Generator, canvas: int, frames: int,
                  steps=(2,)):
    """uint8 [frames, canvas, canvas]: the 8×8 sprite moving `step` pixels a frame (one of `steps`) in
    `direction`, starting where the whole path stays on the canvas."""
    dy, dx = DIRECTIONS[direction]
    step = int(rng.choice(steps))
    travel = step * (frames - 1)
    free = canvas - 8 - travel
    if free < 0:
        raise DataError(f"demo video: a {canvas}-pixel canvas is too small for {frames} frames")
    along, across = int(rng.integers(0, free + 1)), int(rng.integers(0, canvas - 8 + 1))
    if dy + dx < 0:  # moving up / left: start at the far end
        along += travel
    sprite = pixels_88 / 16.0 * 255 * rng.uniform(0.75, 1.0)
    out = np.zeros((frames, canvas, canvas))
    for f in range(frames):
        y, x = (along + f * step * dy, across) if dy else (across, along + f * step * dx)
        out[f, y:y + 8, x:x + 8] = sprite
    return np.clip(out + rng.normal(0, 6, out.shape), 0, 255).astype(np.uint8)


def write_wav(path: Path, wave_N: np.ndarray, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(wave_N, -1, 1) * 32767).round().astype("<i2").tobytes())


def write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """One GIF frame per clip frame, each shown 1/fps s (so sampling at fps keeps every frame)."""
    pics = [Image.fromarray(f, mode="L") for f in frames]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=int(round(1000 / fps)), loop=0)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_words() -> list[str]:
    """Every word a demo record's text uses, in id order after the specials."""
    words = [str(d) for d in range(10)] + list(DIRECTIONS)
    for prompt in PROMPTS.values():
        words += [w for w in prompt.split() if w not in words]
    return words


def build_tokenizer(model_cfg: ModelConfig, path: Path) -> None:
    """A WordLevel tokenizer of exactly model.vocab_size ids: <|endoftext|> 0, <pad> 1, <unk> 2, the
    words, the media placeholders at the ids the model config names, and <unused_k> filling the rest.
    Text splits on whitespace only, so `<|endoftext|>` written in a record is the end-of-text id."""
    ids = model_cfg.media_token_ids()  # tag (= media kind) -> placeholder id
    fixed = {PLACEHOLDERS[tag]: i for tag, i in ids.items()}
    free = (i for i in range(model_cfg.vocab_size) if i not in fixed.values())
    vocab = {w: next(free, None) for w in [EOS, PAD, UNK, *tokenizer_words()]}
    if None in vocab.values():
        raise DataError(f"model.vocab_size ({model_cfg.vocab_size}) is too small for the demo's "
                        f"{len(vocab) + len(fixed)} tokens")
    vocab |= fixed
    vocab |= {f"<unused_{i}>": i for i in sorted(set(range(model_cfg.vocab_size)) - set(vocab.values()))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


# ----------------------------------------------------------------------------------------------
# Records


def _splits(spec: DemoSpec, n_rows: int):
    """(train rows, validation rows, train sequences, validation sequences), disjoint, seeded."""
    rng = np.random.default_rng([spec.seed, 1])
    rows, seqs = rng.permutation(n_rows), rng.permutation(10**spec.audio_digits)
    if not 0 < spec.val_digit_rows < n_rows or not 0 < spec.val_sequences < len(seqs):
        raise DataError(f"demo spec: held-out rows / sequences must leave some for training ({spec})")
    return rows[spec.val_digit_rows:], rows[:spec.val_digit_rows], seqs[spec.val_sequences:], seqs[:spec.val_sequences]


def _record(tag: str, media: str, answer: str) -> dict:
    return {"tag": tag, "segments": [{"text": PROMPTS[tag], "loss": False}, {tag: media},
                                     {"text": f" {answer} {EOS}"}]}


def _write_split(root: Path, split: str, pools: dict, spec: DemoSpec, model_cfg: ModelConfig, digits) -> list:
    """The split's media files and records (tags interleaved in a seeded order)."""
    images, labels = digits
    n = spec.train_per_task if split == "train" else spec.val_per_task
    rng = np.random.default_rng([spec.seed, 2, int(split == "train")])
    records = []
    for tag in model_cfg.media_token_ids():
        (root / tag).mkdir(exist_ok=True)
        for i in range(n):
            name = f"{tag}/{split}_{i:05d}"
            if tag == "image":
                row = pools["rows"][i % len(pools["rows"])]
                Image.fromarray(digit_image(images[row], rng, spec.image_scale), mode="L").save(root / f"{name}.png")
                records.append(_record(tag, f"{name}.png", str(labels[row])))
            elif tag == "audio":
                seq = f"{int(rng.choice(pools['seqs'])):0{spec.audio_digits}d}"
                a = model_cfg.audio
                write_wav(root / f"{name}.wav", dtmf_clip(seq, rng, a.sample_rate, spec.audio_seconds), a.sample_rate)
                records.append(_record(tag, f"{name}.wav", " ".join(seq)))
            else:
                row, direction = rng.choice(pools["rows"]), str(rng.choice(list(DIRECTIONS)))
                frames = motion_frames(images[row], direction, rng, spec.canvas, spec.frames, spec.video_steps)
                write_gif(root / f"{name}.gif", frames, model_cfg.video.fps)
                records.append(_record(tag, f"{name}.gif", direction))
    return [records[i] for i in rng.permutation(len(records))]


def _fingerprint(spec: DemoSpec, model_cfg: ModelConfig) -> dict:
    audio, video = model_cfg.audio, model_cfg.video
    facts = {"version": VERSION, "spec": dataclasses.asdict(spec), "vocab_size": model_cfg.vocab_size,
             "placeholders": model_cfg.media_token_ids(),
             "sample_rate": None if audio is None else audio.sample_rate,
             "fps": None if video is None else video.fps}
    return {**facts, "fingerprint": hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/deepseek_jax, else ~/.cache/deepseek_jax."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepseek_jax"


def demo_records(model_cfg: ModelConfig, cache_dir=None, spec: DemoSpec | None = None) -> Path:
    """The demo folder (module docstring) for this model, written under `cache_dir` (None: the user's
    cache, `default_cache_dir`) if absent, with `spec` (None: DEFAULT_SPEC)."""
    spec = DEFAULT_SPEC if spec is None else spec
    if not model_cfg.media_token_ids():
        raise DataError("data.source demo_media needs a model with model.vision, model.audio or model.video")
    if model_cfg.audio is not None and spec.audio_seconds > model_cfg.audio.max_seconds:
        raise DataError(f"demo audio clips last {spec.audio_seconds} s, longer than model.audio.max_seconds "
                        f"({model_cfg.audio.max_seconds})")
    facts = _fingerprint(spec, model_cfg)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache / f"demo_media_{facts['fingerprint']}"
    if (final / "spec.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo_media_tmp", dir=cache))
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
    try:
        _write_all(tmp, spec, model_cfg, facts)
        try:
            os.replace(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_all(root: Path, spec: DemoSpec, model_cfg: ModelConfig, facts: dict) -> None:
    from sklearn.datasets import load_digits  # ~1 s to import: only when the demo is written

    digits = load_digits()
    train_rows, val_rows, train_seqs, val_seqs = _splits(spec, len(digits.target))
    pools = {"train": {"rows": train_rows, "seqs": train_seqs}, "validation": {"rows": val_rows, "seqs": val_seqs}}
    for split, pool in pools.items():
        records = _write_split(root, split, pool, spec, model_cfg, (digits.images, digits.target))
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    build_tokenizer(model_cfg, root / "tokenizer.json")
    split_facts = {k: [int(x) for x in v] for k, v in
                   {"val_digit_rows": val_rows, "val_sequences": val_seqs}.items()}
    (root / "spec.json").write_text(json.dumps({**facts, **split_facts}, indent=1))
