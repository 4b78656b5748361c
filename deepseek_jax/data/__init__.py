"""Data: documents -> tokenize -> pack -> batch, as one Grain pipeline with exact-resume state.

sources.py lists a config's documents and their train / validation split (and samples them for BPE
training and the unigram baseline); pipeline.py holds the Grain stages, the batch layout and the
resumable iterator (plus the Engram hashing stage). Public API re-exports only.
"""

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
    "engram_stage",
    "list_documents",
    "load_tokenizer",
    "make_iterator",
    "padding_batch",
    "unigram_baseline",
]
