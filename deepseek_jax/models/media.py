"""Media merged into the token embeddings (V4.1 early fusion; media/slots.py holds the contract).

    feats[b] = concat(aligner rows of every picture of row b,  clip 0's audio tokens, clip 1's, ...)
    x[b, t] = feats[b, rows[b, t]]            slots IMAGE, AUDIO
            = image_start / image_newline / image_end, video_start / video_end,
              audio_start / audio_end         their delimiter slots (learned vectors)
            = video_frame[rows[b, t]]         slot FRAME (the frame number within its video)
            = x[b, t]                         text (slot -1), and codes of a modality the model lacks
                                              (IMAGE without vision features, AUDIO without audio ones)

The merge runs right after the token embedding (before mHC expansion); positions stay plain 1-D and
attention causal. The decoder derives span_BT = slots >= 0 from it (router bias_vl, Engram off).

Local letters (this file): R rows of a batch row's feature matrix, G video frame delimiters
(video.max_frames), Z the slot codes (media.slots.N_SLOTS).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.axes import constrain, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.audio import AudioFrontEnd
from deepseek_jax.layers.vision import Aligner, VisionTower
from deepseek_jax.media.slots import (
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    FRAME,
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    N_SLOTS,
    NEWLINE,
    VIDEO_END,
    VIDEO_START,
    MediaInputs,
)

ACT_BTD = ("act_batch", "act_seq", "act_embed")
DELIMITERS = {  # parameter -> slot code, per modality
    "vision": {"image_start": IMAGE_START, "image_newline": NEWLINE, "image_end": IMAGE_END},
    "video": {"video_start": VIDEO_START, "video_end": VIDEO_END},
    "audio": {"audio_start": AUDIO_START, "audio_end": AUDIO_END},
}
VISION_FIELDS = ("patches", "patch_pos", "patch_pic", "unshuffle")
AUDIO_FIELDS = ("mel", "mel_len")


def merge_media(x_BTD, slots_BT, rows_BT, feats_BRD, feature_codes, delimiters_ZD, delimiter_codes, frames_GD):
    """The merged embeddings [B, T, D]: each position's feature row (slots in `feature_codes`),
    delimiter (`delimiter_codes`) or frame vector by its slot code; text and codes in neither list keep
    x. feats_BRD / frames_GD may be None."""
    out_BTD = x_BTD
    is_delim_BT = jnp.isin(slots_BT, jnp.asarray(delimiter_codes, jnp.int32))
    delim_BTD = delimiters_ZD[jnp.clip(slots_BT, 0, N_SLOTS - 1)].astype(x_BTD.dtype)
    out_BTD = jnp.where(is_delim_BT[..., None], delim_BTD, out_BTD)
    if frames_GD is not None:
        frame_BTD = frames_GD[jnp.clip(rows_BT, 0, frames_GD.shape[0] - 1)].astype(x_BTD.dtype)
        out_BTD = jnp.where((slots_BT == FRAME)[..., None], frame_BTD, out_BTD)
    if feats_BRD is not None and feature_codes:
        rows_BT1 = jnp.clip(rows_BT, 0, feats_BRD.shape[1] - 1)[..., None]
        feat_BTD = jnp.take_along_axis(feats_BRD, rows_BT1, axis=1).astype(x_BTD.dtype)
        out_BTD = jnp.where(jnp.isin(slots_BT, jnp.asarray(feature_codes, jnp.int32))[..., None], feat_BTD, out_BTD)
    return out_BTD


class MediaEmbed(nn.Module):
    """Runs the configured front-ends on a batch's media and overwrites the span positions of x.

    Params (only those of the configured modalities): `vision/` (layers/vision.py VisionTower),
    `aligner/` (Aligner), `audio/` (layers/audio.py AudioFrontEnd); delimiters [D] `image_start`,
    `image_newline`, `image_end`, `video_start`, `video_end`, `audio_start`, `audio_end`;
    `video_frame` [video.max_frames, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, media: MediaInputs) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        B, D = x_BTD.shape[0], cfg.dim
        feats, feature_codes = [], []  # a feature code only with its modality's features (IMAGE: vision)
        if cfg.vision is not None and media.patches is not None:
            feats_BPW = VisionTower(cfg.vision, dtype, name="vision")(media.patches, media.patch_pos, media.patch_pic)
            feats.append(Aligner(cfg.vision, D, dtype, name="aligner")(feats_BPW, media.unshuffle))
            feature_codes.append(IMAGE)
        if cfg.audio is not None and media.mel is not None:
            feats.append(AudioFrontEnd(cfg.audio, D, dtype, name="audio")(media.mel, media.mel_len).reshape(B, -1, D))
            feature_codes.append(AUDIO)
        feats_BRD = jnp.concatenate(feats, axis=1) if feats else None
        init = nn.initializers.normal(D**-0.5)
        delimiters_ZD, codes = jnp.zeros((N_SLOTS, D), jnp.float32), []
        for modality, table in DELIMITERS.items():
            if getattr(cfg, modality) is None:
                continue
            for name, code in table.items():
                delimiters_ZD = delimiters_ZD.at[code].set(param(self, name, ("embed",), (D,), init))
                codes.append(code)
        frames_GD = None
        if cfg.video is not None:
            frames_GD = param(self, "video_frame", (None, "embed"), (cfg.video.max_frames, D), init)
        out_BTD = merge_media(x_BTD, media.slots, media.rows, feats_BRD, feature_codes, delimiters_ZD, codes,
                              frames_GD)
        return constrain(out_BTD, ACT_BTD)


def _shape_error(field: str, got, want: str) -> ValueError:
    got = None if got is None else tuple(got.shape)
    return ValueError(f"media.{field} must be {want}, got shape {got}")


def _check_fields(media: MediaInputs, fields: tuple[str, ...], modality: str, configured: bool) -> bool:
    """Whether the modality's fields are given (all or none; only when the model has the modality)."""
    given = [f for f in fields if getattr(media, f) is not None]
    if given and not configured:
        raise ValueError(f"this model has no {modality} (model.{modality} is unset): media.{given[0]} must be None")
    if given and len(given) < len(fields):
        missing = [f for f in fields if f not in given]
        raise ValueError(f"media.{', '.join(fields)} come together: media.{missing[0]} is None")
    for f in given:
        if f not in ("patches", "mel") and not jnp.issubdtype(getattr(media, f).dtype, jnp.integer):
            raise ValueError(f"media.{f} must be integer, got {getattr(media, f).dtype}")
    return bool(given)


def check_media(cfg: ModelConfig, media, tokens_shape: tuple[int, int]) -> None:
    """Host-side shape checks of a call's MediaInputs (ValueError naming the field). Index values
    (rows, unshuffle) are data: only their shapes are checked."""
    if not isinstance(media, MediaInputs):
        raise ValueError(f"media must be a MediaInputs (deepseek_jax.media.slots), got {type(media).__name__}")
    if cfg.vision is None and cfg.audio is None:
        raise ValueError("this model has no media front-end (model.vision and model.audio are unset): pass media=None")
    B, T = tokens_shape
    for f in ("slots", "rows"):
        v = getattr(media, f)
        if v is None or tuple(v.shape) != (B, T) or not jnp.issubdtype(v.dtype, jnp.integer):
            raise _shape_error(f, v, f"an integer [B, T] = [{B}, {T}] array like the tokens")
    if _check_fields(media, VISION_FIELDS, "vision", cfg.vision is not None):
        _check_vision(cfg, media, B)
    if _check_fields(media, AUDIO_FIELDS, "audio", cfg.audio is not None):
        mel, n = media.mel, cfg.audio.n_mels
        if mel.ndim != 4 or mel.shape[0] != B or mel.shape[3] != n or mel.shape[2] < 1:
            raise _shape_error("mel", mel, f"[B, A, F, n_mels] = [{B}, A, F >= 1, {n}]")
        if tuple(media.mel_len.shape) != tuple(mel.shape[:2]):
            raise _shape_error("mel_len", media.mel_len, f"[B, A] = {list(mel.shape[:2])}")


def _check_vision(cfg: ModelConfig, media: MediaInputs, B: int) -> None:
    C, K = cfg.vision.patch_dim, cfg.vision.downsample_ratio**2
    if media.patches.ndim != 3 or media.patches.shape[0] != B or media.patches.shape[2] != C:
        raise _shape_error("patches", media.patches, f"[B, P, 3·p²] = [{B}, P, {C}]")
    P = media.patches.shape[1]
    for f, shape in (("patch_pos", (B, P, 2)), ("patch_pic", (B, P))):
        if tuple(getattr(media, f).shape) != shape:
            raise _shape_error(f, getattr(media, f), str(list(shape)) + " (B, P of media.patches)")
    u = media.unshuffle
    if u.ndim != 3 or u.shape[0] != B or u.shape[2] != K:
        raise _shape_error("unshuffle", u, f"[B, M, r²] = [{B}, M, {K}]")


def init_media(cfg: ModelConfig, T: int) -> MediaInputs | None:
    """A one-row dummy batch of media for `model.init` (every media parameter is created): one
    picture of a 1×1 patch grid, one clip of 4 frames; all positions text. None for a text model."""
    if cfg.vision is None and cfg.audio is None:
        return None
    fields = {"slots": jnp.full((1, T), -1, jnp.int32), "rows": jnp.zeros((1, T), jnp.int32)}
    if cfg.vision is not None:
        K = cfg.vision.downsample_ratio**2
        fields |= {"patches": jnp.zeros((1, 1, cfg.vision.patch_dim), jnp.float32),
                   "patch_pos": jnp.zeros((1, 1, 2), jnp.int32), "patch_pic": jnp.zeros((1, 1), jnp.int32),
                   "unshuffle": jnp.asarray(np.r_[0, np.full(K - 1, -1)].reshape(1, 1, K), jnp.int32)}
    if cfg.audio is not None:
        fields |= {"mel": jnp.zeros((1, 1, 4, cfg.audio.n_mels), jnp.float32),
                   "mel_len": jnp.full((1, 1), 4, jnp.int32)}
    return MediaInputs(**fields)
