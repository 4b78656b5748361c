"""Tokenizer: a thin wrapper over HF `tokenizers`, and byte-level BPE training.

A trained tokenizer is GPT-2 style byte-level BPE (Radford et al. 2019, §2.2): the 256 byte symbols
are the initial alphabet, so every string encodes, and `<|endoftext|>` (id 0) ends each document.
`load_or_train` decides whether to train, reuse a cached one or load a given file; the documents
come from `deepseek_jax.data.sources` (`data.load_tokenizer` is the public entry point). Also here: the
pipeline's `Tokenize` stage and `count_tokens` for the unigram baseline. `DataError` lives here
(re-exported by `data`) because this is the lowest module that raises it.
"""

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grain
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from deepseek_jax.config import DataConfig

EOS_TOKENS = ("<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>")  # first one present is eos
PAD_TOKENS = ("<pad>", "<|pad|>", "<｜▁pad▁｜>")  # first one present is pad; else pad = eos


class DataError(ValueError):
    """A data source, file, field, value or tokenizer is wrong; the message names it."""


class Tokenizer:
    """Encodes text to ids without adding any special tokens (the pipeline appends eos itself)."""

    def __init__(self, tok: tokenizers.Tokenizer, path: Path):
        self._tok = tok
        self.path = Path(path)
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        self._tok.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may be sparse: size the embedding by max id
        eos = next((t for t in EOS_TOKENS if t in vocab), None)
        if eos is None:
            raise DataError(f"tokenizer {self.path} has no end-of-text token (one of {EOS_TOKENS})")
        self.eos_id = vocab[eos]
        self.pad_id = next((vocab[t] for t in PAD_TOKENS if t in vocab), self.eos_id)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path).expanduser()
        if path.is_dir():  # an HF model directory
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the Rust error says what is malformed: keep its text)
            raise DataError(f"tokenizer {path} could not be loaded: {e}") from None
        return cls(tok, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path, corpus_name: str) -> Tokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` ids on `texts` and saves it to `path`."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKENS[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # merges ran out: every word is already one token
        raise DataError(
            f"the training split of {corpus_name} only supports {got} BPE tokens, fewer than "
            f"data.tokenizer_vocab_size={vocab_size}; lower it or use more documents"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: several processes may race
    tok.save(str(tmp))
    os.replace(tmp, path)
    return Tokenizer(tok, path)


def load_or_train(
    cfg: DataConfig,
    run_dir: str | Path,
    model_vocab_size: int,
    train_texts: Callable[[], Iterable[str]],
) -> Tokenizer:
    """`cfg.tokenizer` if given; else `run_dir/tokenizer.json`, trained on `train_texts()` once."""
    if cfg.tokenizer:
        tok = Tokenizer.from_file(cfg.tokenizer)
    else:
        path = Path(run_dir) / "tokenizer.json"
        if path.exists():
            tok = Tokenizer.from_file(path)
            if tok.vocab_size != cfg.tokenizer_vocab_size:
                raise DataError(
                    f"cached tokenizer {path} has {tok.vocab_size} tokens but "
                    f"data.tokenizer_vocab_size is {cfg.tokenizer_vocab_size}; delete it to retrain"
                )
        else:
            tok = train_bpe(train_texts(), cfg.tokenizer_vocab_size, path, repr(cfg.source))
    if tok.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than "
            f"model.vocab_size={model_vocab_size}"
        )
    return tok


class Tokenize(grain.transforms.Map):
    """Grain stage: text -> {"tokens": ids + [eos]} as int32."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict:
        ids = self.tokenizer.encode(text)
        ids.append(self.tokenizer.eos_id)
        return {"tokens": np.asarray(ids, np.int32)}


def count_tokens(texts: Iterable[str], tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
    """[V] counts of the first `max_tokens` tokens of `texts`, each text followed by eos."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, 64)):  # encode_batch runs on all cores
        ids = np.concatenate(
            [np.asarray(x + [tokenizer.eos_id]) for x in tokenizer.encode_batch(chunk)]
        )
        counts += np.bincount(ids[: max_tokens - counts.sum()], minlength=tokenizer.vocab_size)
        if counts.sum() >= max_tokens:
            break
    return counts
