"""How media sit in the token stream: slot codes per position, span layouts, and `MediaInputs`, the
arrays a model call takes with its tokens (host-built by `media.encode`, batched by the data pipeline).

Every position of a media span carries the span's placeholder id in `tokens` (V4.1: 129264 for all
of an image span); what a position holds comes from its slot code:

    image (V4.1, exact):  IMAGE_START, (IMAGE × w, NEWLINE) × h, IMAGE_END          h·(w+1) + 2 slots
    video (ours):         VIDEO_START, per frame f: FRAME(f), (IMAGE × w, NEWLINE) × h, VIDEO_END
    audio (ours):         AUDIO_START, AUDIO × n, AUDIO_END

IMAGE / AUDIO slots take a row of the row's feature matrix (`rows`: aligner rows of every picture
first, then each clip's audio tokens); START / NEWLINE / END and the audio/video delimiters take
learned vectors; FRAME(f) takes learned frame vector f (`rows` = f), which makes frame order explicit.
Codes 0–3 are the official TEXT=-1, START=0, IMAGE=1, NEWLINE=2, END=3.
"""

from typing import NamedTuple

TEXT = -1
IMAGE_START, IMAGE, NEWLINE, IMAGE_END = 0, 1, 2, 3
VIDEO_START, FRAME, VIDEO_END = 4, 5, 6
AUDIO_START, AUDIO, AUDIO_END = 7, 8, 9
N_SLOTS = 10  # codes 0 … 9; TEXT (-1) is not a media slot


def image_span_len(n_llm_h: int, n_llm_w: int) -> int:
    """Positions one image takes: its token grid, one NEWLINE per grid row, START and END."""
    return n_llm_h * (n_llm_w + 1) + 2


def video_span_len(n_frames: int, n_llm_h: int, n_llm_w: int) -> int:
    """Positions one video takes: per frame a FRAME delimiter and its grid rows, plus START / END."""
    return n_frames * (1 + n_llm_h * (n_llm_w + 1)) + 2


class MediaInputs(NamedTuple):
    """One batch's media, per row (leading B: batch-sharded like the tokens). Fields of a modality the
    model lacks are None. Shapes are fixed by the budgets (data.media), so a step compiles once.

    slots     [B, T] int32     slot code per position (TEXT = -1 outside spans)
    rows      [B, T] int32     IMAGE / AUDIO: row of the feature matrix; FRAME: frame number; else 0
    patches   [B, P, 3·p²]     every picture's (image or video frame) patches, processor layout
    patch_pos [B, P, 2] int32  (grid row, grid col) of each patch within its picture (2D RoPE)
    patch_pic [B, P] int32     picture of each patch (attention stays inside one); -1 = padding
    unshuffle [B, M, r²] int32 aligner row m: its r×r window of patch indices, ky-major; -1 = zero
    mel       [B, A, F, n_mels] float32   log-mel frames of each clip (padded)
    mel_len   [B, A] int32     valid frames per clip (0 = no clip)
    """

    slots: object
    rows: object
    patches: object = None
    patch_pos: object = None
    patch_pic: object = None
    unshuffle: object = None
    mel: object = None
    mel_len: object = None

    def span_mask(self):
        """True inside media spans (the router's bias_vl; Engram's dead / gated-off positions)."""
        return self.slots >= 0


BATCH_KEYS = {  # batch dict key -> MediaInputs field (the data pipeline's names)
    "media_slots": "slots", "media_rows": "rows", "patches": "patches", "patch_pos": "patch_pos",
    "patch_pic": "patch_pic", "unshuffle": "unshuffle", "mel": "mel", "mel_len": "mel_len",
}


def media_from_batch(batch: dict) -> MediaInputs | None:
    """The batch's MediaInputs, or None for a text-only batch (no `media_slots`)."""
    if "media_slots" not in batch:
        return None
    return MediaInputs(**{field: batch.get(key) for key, field in BATCH_KEYS.items()})
