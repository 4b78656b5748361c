"""One interleaved record -> token ids, slot codes and media arrays (`RecordEncoder`, run inside Grain
workers), and records -> one packed batch row with the media budgets (`collate_row`).

Record (JSONL line / ArrayRecord JSON): {"segments": [{"text": "Which digit?", "loss": false},
{"image": "imgs/3.png"}, {"text": " 3"}], ...}. A segment holds exactly one of "text" (with an optional
boolean "loss", default true), "image" (path relative to the record file's folder, or {"bytes_b64": …}),
"audio" (WAV path or bytes_b64) or "video" (GIF path, a list of frame image paths, or bytes_b64 of a
GIF). Record-level keys besides "segments" are ignored ("tag", a string, is kept on the result).
The record's end-of-text id is appended (as the text pipeline ends every document) unless its last
text already ends with it; it is a target only when the last segment is a loss text segment.

Row arrays (one row of T; slots.py and the shared contract):
  tokens, positions (restart at 0 per record), segment_ids (1, 2, … per record; 0 = padding),
  loss_mask [T] float32 (1 where token t+1 is loss text of the same record), media_slots, media_rows,
  patches [P, 3p²], patch_pos [P, 2], patch_pic [P] (−1 = padding), unshuffle [M, r²] (indices into P),
  mel [A, F, n_mels], mel_len [A]. The row's feature matrix is the M aligner rows then n_tokens(F)
  rows per clip: an AUDIO slot's row is M + a·n_tokens(F) + j. Vision fields are omitted when the
  budget has no vision config, audio fields when it has no audio config.
"""

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepseek_jax.config.media import AudioConfig, VisionConfig
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.media.audio import load_wav, log_mel
from deepseek_jax.media.image import image_span_slots, llm_grid, load_image, preprocess_image, unshuffle_index
from deepseek_jax.media.slots import (
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    FRAME,
    IMAGE,
    TEXT,
    VIDEO_END,
    VIDEO_START,
)
from deepseek_jax.media.video import load_video, preprocess_video
from deepseek_jax.tokenizer import DataError, Tokenizer

MEDIA_KEYS = ("image", "audio", "video")


@dataclass
class EncodedRecord:
    """One record's positions and media. `ref` [n, 2] int32 per position: IMAGE (picture index, aligner
    row within it), AUDIO (clip index, token j), FRAME (picture index of the frame, frame number f);
    (−1, −1) elsewhere. Picture / clip indices count within this record."""

    name: str
    tokens: np.ndarray  # [n] int32
    slots: np.ndarray  # [n] int32 slot codes (TEXT = −1)
    loss: np.ndarray  # [n] float32: 1 where the position is text of a loss segment
    ref: np.ndarray  # [n, 2] int32
    pictures: list = field(default_factory=list)  # (patches [p, 3p²] float32, (n_vit_h, n_vit_w))
    clips: list = field(default_factory=list)  # log-mel [F_clip, n_mels] float32
    tag: str | None = None


class _Parts:
    """Accumulates a record's pieces in order."""

    def __init__(self):
        self.tokens, self.slots, self.loss, self.ref = [], [], [], []
        self.pictures, self.clips = [], []

    def add(self, token, slots, loss=0.0, ref=None):
        n = len(slots)
        self.tokens.append(np.broadcast_to(np.asarray(token, np.int32), (n,)))
        self.slots.append(np.asarray(slots, np.int32))
        self.loss.append(np.full(n, loss, np.float32))
        self.ref.append(np.full((n, 2), -1, np.int32) if ref is None else np.asarray(ref, np.int32).reshape(n, 2))

    def add_grid(self, token: int, picture: int, n_llm_h: int, n_llm_w: int):
        """One picture's IMAGE/NEWLINE rows (no START/END): IMAGE slots reference aligner rows."""
        slots = image_span_slots(n_llm_h, n_llm_w)[1:-1]
        ref = np.full((len(slots), 2), -1, np.int32)
        ref[slots == IMAGE] = np.stack([np.full(n_llm_h * n_llm_w, picture), np.arange(n_llm_h * n_llm_w)], 1)
        self.add(token, slots, ref=ref)


def _decode_b64(value: dict, where: str) -> bytes:
    if set(value) != {"bytes_b64"} or not isinstance(value["bytes_b64"], str):
        raise DataError(f"{where}: a media object must be {{\"bytes_b64\": \"…\"}}, got keys {sorted(value)}")
    try:
        return base64.b64decode(value["bytes_b64"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: bytes_b64 is not valid base64: {e}") from None


def _source(value, base_dir: Path, where: str, allow_list: bool = False):
    """A segment's media reference -> a Path, bytes, or (video) a list of Paths."""
    if isinstance(value, str):
        return Path(base_dir) / value
    if isinstance(value, dict):
        return _decode_b64(value, where)
    if allow_list and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [Path(base_dir) / v for v in value]
    kinds = "a path, a list of frame paths or {\"bytes_b64\": …}" if allow_list else "a path or {\"bytes_b64\": …}"
    raise DataError(f"{where}: expected {kinds}, got {type(value).__name__}")


class RecordEncoder:
    """Record dict -> EncodedRecord for one model's modalities (picklable: a config and a tokenizer)."""

    def __init__(self, model_cfg: ModelConfig, tokenizer: Tokenizer, *, append_eos: bool = True):
        self.cfg, self.tokenizer, self.append_eos = model_cfg, tokenizer, append_eos
        self.placeholders = set(model_cfg.media_token_ids().values())

    def encode(self, record: dict, base_dir: Path, name: str) -> EncodedRecord:
        segments = record.get("segments") if isinstance(record, dict) else None
        if not isinstance(segments, list) or not segments:
            raise DataError(f"{name}: a record must be an object with a non-empty \"segments\" list")
        tag = record.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise DataError(f"{name}: \"tag\" must be a string, got {type(tag).__name__}")
        parts, last_loss = _Parts(), 0.0
        for i, seg in enumerate(segments):
            where = f"{name} segment {i}"
            kind = self._kind(seg, where)
            try:
                last_loss = getattr(self, f"_{kind}")(parts, seg, Path(base_dir), f"{where} ({kind})")
            except DataError as e:
                raise e if where in str(e) else DataError(f"{where} ({kind}): {e}") from None
        tokens = np.concatenate(parts.tokens)
        if self.append_eos and not (len(tokens) and tokens[-1] == self.tokenizer.eos_id):
            parts.add(self.tokenizer.eos_id, [TEXT], loss=last_loss)
            tokens = np.concatenate(parts.tokens)
        if not len(tokens):
            raise DataError(f"{name}: the record encodes to no tokens")
        return EncodedRecord(
            name=name, tokens=tokens, slots=np.concatenate(parts.slots),
            loss=np.concatenate(parts.loss), ref=np.concatenate(parts.ref), pictures=parts.pictures,
            clips=parts.clips, tag=tag)

    def _kind(self, seg, where: str) -> str:
        if not isinstance(seg, dict):
            raise DataError(f"{where}: a segment must be an object, got {type(seg).__name__}")
        kinds = [k for k in ("text", *MEDIA_KEYS) if k in seg]
        unknown = sorted(set(seg) - {"text", "loss", *MEDIA_KEYS})
        if unknown or len(kinds) != 1 or ("loss" in seg and kinds != ["text"]):
            raise DataError(f"{where}: a segment holds exactly one of text / image / audio / video (\"loss\" "
                            f"only with text); got keys {sorted(seg)}")
        kind = kinds[0]
        if kind != "text" and getattr(self.cfg, "vision" if kind == "image" else kind) is None:
            article = "a" if kind == "video" else "an"
            raise DataError(f"{where}: {article} {kind} segment, but the model has no "
                            f"`{'vision' if kind == 'image' else kind}` config")
        return kind

    def _text(self, parts: _Parts, seg: dict, base_dir: Path, where: str) -> float:
        text, loss = seg["text"], seg.get("loss", True)
        if not isinstance(text, str) or not isinstance(loss, bool):
            raise DataError(f"{where}: \"text\" must be a string and \"loss\" a boolean")
        ids = self.tokenizer.encode(text)
        clash = sorted(self.placeholders & set(ids))
        if clash:
            raise DataError(f"{where}: the text encodes to media placeholder id(s) {clash}")
        parts.add(ids, np.full(len(ids), TEXT), loss=float(loss))
        return float(loss)

    def _image(self, parts: _Parts, seg: dict, base_dir: Path, where: str) -> float:
        vision = self.cfg.vision
        patches, grid = preprocess_image(load_image(_source(seg["image"], base_dir, where), where), vision)
        n_h, n_w = llm_grid(*grid, vision.downsample_ratio)
        picture = len(parts.pictures)
        parts.pictures.append((patches, grid))
        span = image_span_slots(n_h, n_w)
        parts.add(vision.image_token_id, span[:1])
        parts.add_grid(vision.image_token_id, picture, n_h, n_w)
        parts.add(vision.image_token_id, span[-1:])
        return 0.0

    def _video(self, parts: _Parts, seg: dict, base_dir: Path, where: str) -> float:
        video, vision = self.cfg.video, self.cfg.vision
        frames = load_video(_source(seg["video"], base_dir, where, allow_list=True), where, video)
        pictures = preprocess_video(frames, video, vision)
        n_h, n_w = llm_grid(*pictures[0][1], vision.downsample_ratio)
        tok = video.video_token_id
        parts.add(tok, [VIDEO_START])
        for f, picture in enumerate(pictures):
            parts.add(tok, [FRAME], ref=[len(parts.pictures), f])
            parts.add_grid(tok, len(parts.pictures), n_h, n_w)
            parts.pictures.append(picture)
        parts.add(tok, [VIDEO_END])
        return 0.0

    def _audio(self, parts: _Parts, seg: dict, base_dir: Path, where: str) -> float:
        audio = self.cfg.audio
        wave_ = load_wav(_source(seg["audio"], base_dir, where), where, audio.sample_rate)
        seconds = len(wave_) / audio.sample_rate
        if seconds > audio.max_seconds:
            raise DataError(f"{where}: the clip lasts {seconds:.2f} s, over audio.max_seconds = {audio.max_seconds}")
        mel = log_mel(wave_, audio)
        n = audio.n_tokens(mel.shape[0])
        clip = len(parts.clips)
        parts.clips.append(mel)
        tok = audio.audio_token_id
        parts.add(tok, [AUDIO_START])
        parts.add(tok, np.full(n, AUDIO), ref=np.stack([np.full(n, clip), np.arange(n)], 1))
        parts.add(tok, [AUDIO_END])
        return 0.0


@dataclass(frozen=True, kw_only=True)
class MediaBudget:
    """Per-row media budgets (fixed shapes: a step compiles once), with the geometry the arrays need.
    `vision` / `audio` None = the model lacks that modality (its fields are left out of the row)."""

    max_patches: int  # P, ViT patches of all pictures of a row
    max_image_rows: int  # M, aligner rows (LLM image tokens) of all pictures of a row
    max_audio_clips: int  # A, clips per row
    max_audio_frames: int  # F, log-mel frames per clip
    vision: VisionConfig | None
    audio: AudioConfig | None

    def __post_init__(self):
        for k in ("max_patches", "max_image_rows", "max_audio_clips", "max_audio_frames"):
            if not isinstance(getattr(self, k), (int, np.integer)) or getattr(self, k) < 0:
                raise DataError(f"MediaBudget.{k} must be an int >= 0, got {getattr(self, k)!r}")

    @classmethod
    def for_model(cls, model_cfg: ModelConfig, *, max_patches: int = 0, max_image_rows: int = 0,
                  max_audio_clips: int = 0, max_audio_frames: int = 0) -> "MediaBudget":
        return cls(max_patches=max_patches, max_image_rows=max_image_rows, max_audio_clips=max_audio_clips,
                   max_audio_frames=max_audio_frames, vision=model_cfg.vision, audio=model_cfg.audio)

    @classmethod
    def fitting(cls, model_cfg: ModelConfig, records: list["EncodedRecord"], *, at_least: int = 0) -> "MediaBudget":
        """The budget that fits each of `records` alone exactly: its largest media (`record_cost`), each
        budget at least `at_least` (1: no media array is empty)."""
        costs = np.array([record_cost(r)[1:] for r in records], np.int64).reshape(-1, 4)
        patches, rows, clips, frames = (max(int(c), at_least) for c in costs.max(axis=0, initial=0))
        return cls.for_model(model_cfg, max_patches=patches, max_image_rows=rows, max_audio_clips=clips,
                             max_audio_frames=frames)


def record_cost(rec: EncodedRecord) -> tuple[int, int, int, int, int]:
    """(tokens, patches, image_rows, clips, frames) one record takes from a row; frames = its longest
    clip (the per-clip budget). Image rows = Σ ⌈h/r⌉·⌈w/r⌉ over its pictures = its IMAGE slots."""
    patches = sum(p.shape[0] for p, _ in rec.pictures)
    rows = int(np.sum(rec.slots == IMAGE))
    frames = max((c.shape[0] for c in rec.clips), default=0)
    return len(rec.tokens), patches, rows, len(rec.clips), frames


def check_record_fits(rec: EncodedRecord, T: int, budgets: MediaBudget) -> None:
    """Raises DataError naming the record and the budget when the record alone cannot fit a row."""
    limits = (T, budgets.max_patches, budgets.max_image_rows, budgets.max_audio_clips, budgets.max_audio_frames)
    what = ("tokens (seq_len)", "ViT patches (max_patches)", "image rows (max_image_rows)",
            "audio clips (max_audio_clips)", "log-mel frames (max_audio_frames)")
    for need, limit, label in zip(record_cost(rec), limits, what):
        if need > limit:
            raise DataError(f"{rec.name}: the record needs {need} {label}, over the row's budget of {limit}")
    if rec.pictures and budgets.vision is None:
        raise DataError(f"{rec.name}: the record has pictures but the model has no vision config")
    if rec.clips and budgets.audio is None:
        raise DataError(f"{rec.name}: the record has audio but the model has no audio config")


def _row_arrays(T: int, budgets: MediaBudget, pad_id: int) -> dict[str, np.ndarray]:
    row = {"tokens": np.full(T, pad_id, np.int32), "positions": np.zeros(T, np.int32),
           "segment_ids": np.zeros(T, np.int32), "loss_mask": np.zeros(T, np.float32),
           "media_slots": np.full(T, TEXT, np.int32), "media_rows": np.zeros(T, np.int32)}
    if budgets.vision is not None:
        P, M, r = budgets.max_patches, budgets.max_image_rows, budgets.vision.downsample_ratio
        row |= {"patches": np.zeros((P, budgets.vision.patch_dim), np.float32),
                "patch_pos": np.zeros((P, 2), np.int32), "patch_pic": np.full(P, -1, np.int32),
                "unshuffle": np.full((M, r * r), -1, np.int32)}
    if budgets.audio is not None:
        A, F = budgets.max_audio_clips, budgets.max_audio_frames
        row |= {"mel": np.zeros((A, F, budgets.audio.n_mels), np.float32), "mel_len": np.zeros(A, np.int32)}
    return row


def _place_pictures(row: dict, rec: EncodedRecord, at: tuple[int, int, int], r: int) -> list[int]:
    """Writes a record's pictures from (patch, aligner row, picture id) offsets `at`; returns each
    picture's first aligner row."""
    patch0, row0, pic0 = at
    starts = []
    for k, (patches, (h, w)) in enumerate(rec.pictures):
        n = h * w
        row["patches"][patch0:patch0 + n] = patches
        row["patch_pos"][patch0:patch0 + n] = np.stack(np.divmod(np.arange(n), w), 1)
        row["patch_pic"][patch0:patch0 + n] = pic0 + k
        index = unshuffle_index(h, w, r)
        row["unshuffle"][row0:row0 + len(index)] = np.where(index >= 0, index + patch0, -1)
        starts.append(row0)
        patch0, row0 = patch0 + n, row0 + len(index)
    return starts


def collate_row(records: list[EncodedRecord], T: int, budgets: MediaBudget, *, pad_id: int = 0):
    """Packs whole records, in order, into one row of T positions (module docstring); raises DataError
    naming the records when they do not fit together (and naming one that cannot fit alone)."""
    for rec in records:
        check_record_fits(rec, T, budgets)
    totals = np.sum([record_cost(rec)[:4] for rec in records], axis=0, dtype=np.int64) if records else [0] * 4
    limits = (T, budgets.max_patches, budgets.max_image_rows, budgets.max_audio_clips)
    if any(need > limit for need, limit in zip(totals, limits)):
        raise DataError(f"records {[r.name for r in records]} need (tokens, patches, image rows, clips) = "
                        f"{tuple(int(t) for t in totals)}, over the row's {limits}")
    row = _row_arrays(T, budgets, pad_id)
    n_tok = budgets.audio.n_tokens(budgets.max_audio_frames) if budgets.audio is not None else 0
    t0 = patch0 = row0 = pic0 = clip0 = 0
    for seg, rec in enumerate(records, start=1):
        n, span = len(rec.tokens), slice(t0, t0 + len(rec.tokens))
        row["tokens"][span], row["media_slots"][span] = rec.tokens, rec.slots
        row["positions"][span], row["segment_ids"][span] = np.arange(n), seg
        row["loss_mask"][t0:t0 + n - 1] = rec.loss[1:]  # target t+1 is loss text of this record
        rows = np.zeros(n, np.int64)
        if rec.pictures:
            starts = np.asarray(_place_pictures(row, rec, (patch0, row0, pic0), budgets.vision.downsample_ratio))
            image = rec.slots == IMAGE
            rows[image] = starts[rec.ref[image, 0]] + rec.ref[image, 1]
        for a, mel in enumerate(rec.clips):
            row["mel"][clip0 + a, :len(mel)], row["mel_len"][clip0 + a] = mel, len(mel)
        audio = rec.slots == AUDIO
        rows[audio] = budgets.max_image_rows + (clip0 + rec.ref[audio, 0]) * n_tok + rec.ref[audio, 1]
        frame = rec.slots == FRAME
        rows[frame] = rec.ref[frame, 1]
        row["media_rows"][span] = rows
        _, n_patch, n_rows, n_clips, _ = record_cost(rec)
        t0, patch0, row0, clip0 = t0 + n, patch0 + n_patch, row0 + n_rows, clip0 + n_clips
        pic0 += len(rec.pictures)
    return row
