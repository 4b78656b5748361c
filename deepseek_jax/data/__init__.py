"""Data: documents -> tokenize -> pack -> batch, as one Grain pipeline with exact-resume state.

sources.py lists a config's documents and their train / validation split (and samples them for BPE
training and the unigram baseline); pipeline.py holds the Grain stages, the batch layout and the
resumable iterator (plus the Engram hashing stage). Interleaved text + media records (`data.media`):
media_records.py lists and splits them, media_pack.py encodes and packs them into rows with media
arrays (the same iterator, batches and Engram stage). Public API re-exports only.
"""

from deepseek_jax.data.media_pack import media_budget, media_row
from deepseek_jax.data.media_records import list_records
from deepseek_jax.data.pipeline import (
    DataIterator,
    EngramRows,
    build_dataset,
    engram_stage,
    make_iterator,
    padding_batch,
)
from deepseek_jax.data.sources import (
    SPLITS,
    Documents,
    check_splits,
    list_documents,
    load_tokenizer,
    unigram_baseline,
)
from deepseek_jax.tokenizer import DataError, Tokenizer

__all__ = [
    "SPLITS",
    "DataError",
    "DataIterator",
    "Documents",
    "EngramRows",
    "Tokenizer",
    "build_dataset",
    "check_splits",
    "engram_stage",
    "list_documents",
    "list_records",
    "load_tokenizer",
    "make_iterator",
    "media_budget",
    "media_row",
    "padding_batch",
    "unigram_baseline",
]
