"""Data: documents -> tokenize -> pack -> batch, as one Grain pipeline with exact-resume state.

sources.py lists a config's documents and their train / validation split (and samples them for BPE
training and the unigram baseline); pipeline.py holds the Grain stages, the batch layout and the
resumable iterator. Public API re-exports only.
"""

from deepseek_jax.data.pipeline import DataIterator, build_dataset, make_iterator, padding_batch
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
    "Tokenizer",
    "build_dataset",
    "list_documents",
    "load_tokenizer",
    "make_iterator",
    "padding_batch",
    "unigram_baseline",
]
