"""Generation from images, audio and video (V4.1 early fusion; media/slots.py holds the contract).

A prompt is an interleaved record (media/encode.py): a marker `<image>` / `<audio>` / `<video>` in its text
places the next medium of that kind there; the media no marker places come first, in the order given (the
CLI: the order of the --image / --audio / --video flags; `sample_media`: images, then audio, then video),
then the prompt text. It is encoded with no end-of-text id, and prefilled in ONE chunk with its
media merged in (`MediaInputs` of that single row, the budgets sized exactly to it), so the cache holds
the media positions; the decode steps after it are text only (`generate.decode`). A model with Engram
hashes the prompt with the span positions dead (no n-gram crosses a span). Prompts run one at a time
(batch 1): each has media shapes of its own, and V4 row positions admit no left padding anyway.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import numpy as np

from deepseek_jax.engram_hash import compressed_vocab
from deepseek_jax.generate import (
    _engram_state,
    _prefill,
    _spec_stats,
    check_prompts,
    check_sampling,
    decode,
    speculative_generate,
)
from deepseek_jax.inspect_model import InputError
from deepseek_jax.media.encode import MediaBudget, RecordEncoder, collate_row
from deepseek_jax.media.slots import MediaInputs, media_from_batch
from deepseek_jax.models import build_cache
from deepseek_jax.models.media import AUDIO_FIELDS, VISION_FIELDS
from deepseek_jax.tokenizer import DataError

MODALITIES = {"image": ("--image", "vision"), "audio": ("--audio", "audio"), "video": ("--video", "video")}


MARKER = re.compile(r"<(image|audio|video)>")  # where a prompt places its next medium of that kind


def media_record(prompt: str, media: Sequence[tuple[str, str | Path]] = ()) -> dict:
    """The record of a prompt and `media` [(kind, path), …] (kind image / audio / video): a marker
    `<image>` / `<audio>` / `<video>` in the text takes the next unplaced medium of its kind (flag order);
    the media no marker places come first, in order, then the text."""
    for kind, source in media:
        if kind not in MODALITIES:
            raise DataError(f"media kind {kind!r} ({source}): expected one of {sorted(MODALITIES)}")
    placed, inline = set(), []
    for i, part in enumerate(MARKER.split(prompt)):
        if i % 2 == 0:  # text between markers
            inline += [{"text": part}] if part else []
            continue
        k = next((j for j, (kind, _) in enumerate(media) if kind == part and j not in placed), None)
        if k is None:
            raise DataError(f"the prompt has more <{part}> markers than {MODALITIES[part][0]} files were given")
        placed.add(k)
        inline.append({part: str(media[k][1])})
    segments = [{kind: str(source)} for j, (kind, source) in enumerate(media) if j not in placed] + inline
    return {"segments": segments or [{"text": ""}]}


def check_modalities(cfg, record: dict) -> None:
    """A DataError naming the input (and its CLI flag) when the record holds media of a modality the
    model lacks."""
    for seg in record.get("segments", []) if isinstance(record, dict) else []:
        for kind, (flag, field) in MODALITIES.items():
            if isinstance(seg, dict) and kind in seg and getattr(cfg, field) is None:
                raise DataError(f"{kind} input ({flag}) given but the model has no model.{field}: "
                                f"it cannot take {kind} input")


def encode_prompt(cfg, tokenizer, record: dict, base_dir: str | Path = ".",
                  name: str = "prompt") -> tuple[np.ndarray, MediaInputs | None]:
    """(tokens [1, P] int32, the prompt's MediaInputs: batch 1, budgets exactly its own, fields of a
    front-end it does not use left None; None for a text-only prompt). Media paths are relative to
    base_dir; a missing or corrupt file is a DataError naming it."""
    check_modalities(cfg, record)
    rec = RecordEncoder(cfg, tokenizer, append_eos=False).encode(record, Path(base_dir), name)
    row = collate_row([rec], len(rec.tokens), MediaBudget.fitting(cfg, [rec]), pad_id=tokenizer.pad_id)
    tokens_1P = row["tokens"][None]
    if not (rec.slots >= 0).any():
        return tokens_1P, None
    unused = (() if rec.pictures else VISION_FIELDS) + (() if rec.clips else AUDIO_FIELDS)  # collate_row keys
    return tokens_1P, media_from_batch({k: v[None] for k, v in row.items() if k not in unused})


def generate_media(model: nn.Module, variables, tokens_1P, media: MediaInputs | None, max_new_tokens: int,
                   eos_id: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   engram_map: np.ndarray | None = None, speculative: bool = False,
                   stats: dict | None = None) -> list[int]:
    """New token ids (eos excluded, at most `max_new_tokens`) of one prompt (`encode_prompt`) prefilled
    with its media. engram_map: as `generate`. speculative=True (DSpark, greedy): the same tokens, drafted
    and verified; its statistics accumulate into `stats` over calls."""
    cfg = model.cfg
    tokens_1P = np.asarray(tokens_1P, np.int32)
    if tokens_1P.ndim != 2 or tokens_1P.shape[0] != 1:
        raise InputError(f"generate_media takes one non-empty prompt, tokens [1, P]; got shape {tokens_1P.shape}")
    check_sampling(max_new_tokens, temperature, top_p, speculative=speculative)
    check_prompts(list(tokens_1P), max_new_tokens, cfg.max_seq_len)
    P = tokens_1P.shape[1]
    if speculative:
        return _speculative_media(model, variables, tokens_1P, media, max_new_tokens, eos_id, engram_map, stats)
    engram = _engram_state(cfg, engram_map, 1)
    dead_1P = None if media is None else np.asarray(media.slots) >= 0  # no n-gram crosses a media span
    engram_rows = None if engram is None else engram.step(tokens_1P, dead_1P)
    cache = build_cache(cfg, 1, P + max_new_tokens)
    logits_1V, cache, _ = _prefill(model, variables, tokens_1P, None, cache, None, engram_rows, media)
    return decode(model, variables, logits_1V, cache, P, None, engram, max_new_tokens, eos_id, temperature,
                  top_p, seed)[0]


def _speculative_media(model, variables, tokens_1P, media, max_new_tokens, eos_id, engram_map, stats):
    """`generate_media(..., speculative=True)`: DSpark drafts after the media prefill."""
    out, spec = speculative_generate(model, variables, tokens_1P.tolist(), max_new_tokens, eos_id, engram_map, media)
    if stats is not None:
        steps, accepted = stats.get("steps", 0) + spec["steps"], stats.get("accepted", 0) + spec["accepted"]
        stats.update(_spec_stats(steps, accepted, model.cfg.dspark.block_size))
    return out[0]


def sample_media(model: nn.Module, variables, tokenizer, prompt: str | dict, images: Sequence = (),
                 audios: Sequence = (), videos: Sequence = (), max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, speculative: bool = False, stats: dict | None = None,
                 base_dir: str | Path = ".") -> str:
    """The completion of one prompt with media: the text `prompt` with the images, audio clips (WAV)
    and videos (GIF), a marker `<image>` / `<audio>` / `<video>` in the text placing the next of its kind
    there and the unplaced ones first (images, then audio, then video), then the text (`media_record`);
    or `prompt` a whole interleaved record (media/encode.py; then no images / audios / videos). Paths
    are relative to base_dir."""
    if isinstance(prompt, dict):
        if images or audios or videos:
            raise ValueError("sample_media: give media either in the record or as images / audios / videos")
        record = prompt
    else:
        media = [("image", p) for p in images] + [("audio", p) for p in audios] + [("video", p) for p in videos]
        record = media_record(prompt, media)
    tokens_1P, media_inputs = encode_prompt(model.cfg, tokenizer, record, base_dir)
    engram_map = None if model.cfg.engram is None else compressed_vocab(tokenizer)
    new = generate_media(model, variables, tokens_1P, media_inputs, max_new_tokens, tokenizer.eos_id, temperature,
                         top_p, seed, engram_map, speculative, stats)
    return tokenizer.decode(new)
