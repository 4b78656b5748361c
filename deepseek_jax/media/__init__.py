"""Media on the host: slot codes and span layouts (slots.py), the V4.1 image processor (image.py),
video frames (video.py), audio log-mel (audio.py) and one record's media -> model inputs (encode.py).
Nothing here imports JAX; the model side (layers/vision.py, layers/audio.py, models/media.py) reads
the `MediaInputs` these build."""

from deepseek_jax.media.slots import (
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    BATCH_KEYS,
    FRAME,
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    N_SLOTS,
    NEWLINE,
    TEXT,
    VIDEO_END,
    VIDEO_START,
    MediaInputs,
    image_span_len,
    media_from_batch,
    video_span_len,
)

__all__ = [
    "AUDIO",
    "AUDIO_END",
    "AUDIO_START",
    "BATCH_KEYS",
    "FRAME",
    "IMAGE",
    "IMAGE_END",
    "IMAGE_START",
    "N_SLOTS",
    "NEWLINE",
    "TEXT",
    "VIDEO_END",
    "VIDEO_START",
    "MediaInputs",
    "image_span_len",
    "media_from_batch",
    "video_span_len",
]
