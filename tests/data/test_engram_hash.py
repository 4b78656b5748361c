"""Engram hashing on the host (engram_hash.py; V4.1 reference §2.1-§2.3, §2.6): the layout's test
vectors, hash_rows against an integer-only statement, the incremental state, the compressed
vocabulary, the error messages, and the Grain stage that adds `engram_rows` to batches."""

import dataclasses
import json
import re
import types
import unicodedata

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from deepseek_jax import data
from deepseek_jax.config import ConfigError, DataConfig, EngramConfig, load_model_config
from deepseek_jax.data import Tokenizer
from deepseek_jax.engram_hash import (
    EngramHashState,
    check_compressed_vocab,
    compressed_vocab,
    engram_layout,
    hash_rows,
    is_prime,
)
from deepseek_jax.generate import generate

RELEASE = EngramConfig(layer_ids=(1, 14), num_embeddings=(384_006_168, 384_016_682), compressed_vocab_size=99_092)
LAYER1_PRIMES = [  # §2.1, n = 2, 3, 4 (rows) × heads 0..7
    [16000057, 16000079, 16000081, 16000097, 16000121, 16000129, 16000133, 16000183],
    [16000189, 16000207, 16000211, 16000253, 16000277, 16000289, 16000307, 16000321],
    [16000339, 16000381, 16000393, 16000399, 16000403, 16000409, 16000447, 16000463],
]
RELEASE_MULTIPLIERS = [  # §2.1, numpy's PCG64 (reference §6 item 3)
    [76632096046245, 4839876093313, 35959672319349, 73987337458391],
    [67716810739261, 51510806800915, 30921347202721, 82619226485591],
]
TINY_PRIMES = [[[31, 37], [41, 43]], [[47, 53], [59, 61]]]  # §5: layer 1 {31, 37 | 41, 43}, layer 4 {...}
WORDS = ["Apple", "apple", "APPLE", "ĠApple", "Ãī", "Ã©", "ĠĠ", "ĊĊ", "ĠĊ", "ĠThe", "the"]  # byte-level


def tiny_cfg(compressed_vocab_size: int, layer_ids=(1, 4), **kw) -> EngramConfig:
    return EngramConfig(layer_ids=layer_ids, num_embeddings=(152, 220), max_ngram_size=3, n_heads=2,
                        head_dim=32, vocab_size=31, compressed_vocab_size=compressed_vocab_size, pad_id=0, **kw)


def byte_bpe() -> tokenizers.Tokenizer:
    """Byte-level BPE: `<|endoftext|>` = 0, the 256 byte symbols, then WORDS (case, accent and space
    variants); merges make "Apple", " Apple", "the", " The" encode as one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    merges = [("A", "p"), ("Ap", "p"), ("App", "l"), ("Appl", "e"), ("Ġ", "Apple"), ("t", "h"), ("th", "e"),
              ("Ġ", "T"), ("ĠT", "h"), ("ĠTh", "e")]
    for w in ("Ap", "App", "Appl", "th", "ĠT", "ĠTh"):
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


@pytest.fixture(scope="module")
def cmap(tok):
    return compressed_vocab(tok)


# ----------------------------------------------------------------------------------------------
# (a) Layout: §2.1 test vectors


def test_release_layout_matches_reference_vectors():
    layout = engram_layout(RELEASE)
    np.testing.assert_array_equal(layout.primes_LWN[0], LAYER1_PRIMES)
    assert layout.primes_LWN[1, 0, 0] == 16000477 and layout.primes_LWN[1, -1, -1] == 16000889
    assert layout.table_sizes == (384_006_168, 384_016_682)
    np.testing.assert_array_equal(layout.offsets_LU[0, :4], [0, 16000057, 32000136, 48000217])
    np.testing.assert_array_equal(layout.offsets_LU[:, -1] + layout.primes_LWN[:, -1, -1], layout.table_sizes)
    np.testing.assert_array_equal(layout.multipliers_LX, RELEASE_MULTIPLIERS)
    assert layout.multipliers_LX.dtype == np.int64 and layout.n_columns == 24


def test_moduli_are_the_successive_primes():
    """Every modulus is prime, all are distinct, and none between vocab_size and the largest is
    skipped (one global "seen" set); checked by trial division, independent of Miller–Rabin."""
    def trial(n):
        return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if trial(n)]
    layout = engram_layout(tiny_cfg(10))
    np.testing.assert_array_equal(layout.primes_LWN, TINY_PRIMES)
    assert layout.table_sizes == (152, 220)
    flat = engram_layout(RELEASE).primes_LWN.ravel().tolist()
    assert flat == sorted(set(flat)) == [n for n in range(16_000_000, flat[-1] + 1) if trial(n)]


# ----------------------------------------------------------------------------------------------
# (b) hash_rows against an integer-only statement


def wrap64(v: int) -> int:
    """Python int -> the signed 64-bit two's-complement value numpy's int64 would hold."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def reference_rows(cfg, primes, multipliers, cmap, tokens, segments, dead):
    """§2.3 with plain ints, one position at a time; offsets are the running sums of the primes."""
    X, out = cfg.max_ngram_size, []
    pad = int(cmap[cfg.pad_id])
    for b, row in enumerate(tokens):
        out.append([])
        for t in range(len(row)):
            toks, blocked = [], False
            for s in range(X):
                j = t - s
                blocked = blocked or j < 0 or dead[b][j] or segments[b][j] == 0 or segments[b][j] != segments[b][t]
                toks.append(pad if blocked else int(cmap[row[j]]))
            per_layer = []
            for layer_primes, m in zip(primes, multipliers):
                h, offset, cols = wrap64(toks[0] * int(m[0])), 0, []
                for n in range(2, X + 1):
                    h = wrap64(h ^ wrap64(toks[n - 1] * int(m[n - 1])))
                    for p in layer_primes[n - 2]:
                        cols.append(h % int(p) + offset)
                        offset += int(p)
                per_layer.append(cols)
            out[-1].append(per_layer)
    return np.array(out, np.int64)


def random_inputs(rng, V, B, T):
    tokens = rng.integers(0, V, (B, T))
    segments = np.cumsum(rng.random((B, T)) < 0.15, axis=1) + 1  # document starts
    segments[0, T - 5:] = 0  # a padded tail
    dead = rng.random((B, T)) < 0.1  # image-span slots
    return tokens, segments, dead


@pytest.mark.parametrize("which", ["tiny", "release"])
def test_hash_rows_matches_integer_statement(which, cmap):
    rng = np.random.default_rng(0)
    if which == "tiny":
        cfg, primes, cm = tiny_cfg(int(cmap.max()) + 1), TINY_PRIMES, cmap
    else:  # any map into [0, V′): the hash only sees compressed ids
        cfg, primes, cm = RELEASE, [LAYER1_PRIMES, engram_layout(RELEASE).primes_LWN[1]], rng.integers(0, 99_092, 500)
        cm[2] = 99_091  # the largest compressed id, as the pad: products near the int64 limit
    layout = engram_layout(cfg)
    tokens, segments, dead = random_inputs(rng, len(cm), 3, 37)
    got = hash_rows(layout, cm, tokens, segments, dead)
    assert got.dtype == np.int32 and got.shape == (3, 37, 2, cfg.n_columns)
    want = reference_rows(cfg, primes, layout.multipliers_LX, cm, tokens, segments, dead)
    np.testing.assert_array_equal(got, want)
    ones = np.ones_like(segments)
    np.testing.assert_array_equal(
        hash_rows(layout, cm, tokens),
        reference_rows(cfg, primes, layout.multipliers_LX, cm, tokens, ones, np.zeros_like(dead)))


def test_dead_current_token_hashes_pure_pad(cmap):
    layout = engram_layout(tiny_cfg(int(cmap.max()) + 1))
    tokens = np.array([[40, 41, 42, 43]])
    rows = hash_rows(layout, cmap, tokens, dead_BT=np.array([[False, False, True, False]]))
    pad_rows = hash_rows(layout, cmap, np.zeros((1, 1), int))[0, 0]
    np.testing.assert_array_equal(rows[0, 2], pad_rows)  # the dead token: every n-gram is pure pad
    np.testing.assert_array_equal(rows[0, 3], hash_rows(layout, cmap, tokens[:, 3:])[0, 0])  # restarts
    assert (rows < np.array(layout.table_sizes)[:, None]).all() and (rows >= 0).all()


# ----------------------------------------------------------------------------------------------
# (c) Incremental state


@pytest.mark.parametrize("chunks", [[17, 24, 1, 1, 1, 1], [1] * 46, [46], [2, 3, 5, 7, 11, 18]])
@pytest.mark.parametrize("with_segments", [True, False])
def test_state_in_chunks_equals_full_hashing(chunks, with_segments, cmap):
    layout = engram_layout(dataclasses.replace(tiny_cfg(int(cmap.max()) + 1), max_ngram_size=4, n_heads=1,
                                               num_embeddings=(31 + 37 + 41, 43 + 47 + 53)))
    tokens, segments, dead = random_inputs(np.random.default_rng(1), len(cmap), 3, sum(chunks))
    segments = segments if with_segments else None
    state, got, t = EngramHashState(layout, cmap, 3), [], 0
    for n in chunks:
        seg = None if segments is None else segments[:, t:t + n]
        got.append(state.step(tokens[:, t:t + n], dead[:, t:t + n], seg))
        t += n
    np.testing.assert_array_equal(np.concatenate(got, axis=1), hash_rows(layout, cmap, tokens, segments, dead))


def test_state_reorder_follows_rows(cmap):
    layout = engram_layout(tiny_cfg(int(cmap.max()) + 1))
    tokens = np.random.default_rng(2).integers(0, len(cmap), (3, 9))
    state = EngramHashState(layout, cmap, 3)
    state.step(tokens[:, :5])
    order = [2, 0, 0, 1]
    state.reorder(order)
    more = np.random.default_rng(3).integers(0, len(cmap), (4, 4))
    want = hash_rows(layout, cmap, np.concatenate([tokens[order, :5], more], axis=1))[:, 5:]
    np.testing.assert_array_equal(state.step(more), want)


def test_left_padding_marked_dead_hashes_as_unpadded(cmap):
    """generate's prefill: a left-padded prompt's rows equal the unpadded prompt's."""
    layout = engram_layout(tiny_cfg(int(cmap.max()) + 1))
    prompt = np.array([[5, 6, 7, 8]])
    padded = np.concatenate([np.zeros((1, 3), int), prompt], axis=1)
    rows = EngramHashState(layout, cmap, 1).step(padded, np.arange(7)[None] < 3)
    np.testing.assert_array_equal(rows[:, 3:], hash_rows(layout, cmap, prompt))


# ----------------------------------------------------------------------------------------------
# (d) Compressed vocabulary


def reference_key(tok, i):
    """§2.2 restated with unicodedata / re (not tokenizers.normalizers)."""
    text = tok.decode([i], skip_special_tokens=False)
    if "\ufffd" in text:
        return tok.id_to_token(i)
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if unicodedata.category(c) != "Mn").lower()
    t = re.sub(r"[ \t\r\n]+", " ", t)
    t = " " if t == " " else t.strip(" \t\n\r\x0b\x0c")
    return t or text


def test_compressed_vocab_folds_case_accents_and_spaces(tok, cmap):
    ids = tok.get_vocab(with_added_tokens=True)
    same = lambda *ws: len({int(cmap[ids[w]]) for w in ws}) == 1  # noqa: E731
    assert same("Apple", "apple", "APPLE", "ĠApple")
    assert same("Ãī", "Ã©", "e", "E")  # É, é, e, E
    assert same("Ġ", "ĠĠ", "Ċ", "ĊĊ", "ĠĊ", "ĉ")  # space runs stay one " " (the sentinel)
    assert same("ĠThe", "the") and not same("Apple", "the")
    for partial in ("Ã", "©"):  # one byte of "é": decodes to U+FFFD, keyed by the raw token string
        assert tok.decode([ids[partial]]) == "\ufffd"
        assert (cmap == cmap[ids[partial]]).sum() == 1
    assert cmap[0] == 0 and cmap.dtype == np.int64 and len(cmap) == tok.get_vocab_size()
    np.testing.assert_array_equal(np.unique(cmap), np.arange(cmap.max() + 1))  # dense, first-appearance order
    keys = [reference_key(tok, i) for i in range(len(cmap))]
    want = np.array([list(dict.fromkeys(keys)).index(k) for k in keys])
    np.testing.assert_array_equal(cmap, want)


def test_compressed_vocab_accepts_project_tokenizer(tok, cmap, tmp_path):
    tok.save(str(tmp_path / "t.json"))
    np.testing.assert_array_equal(compressed_vocab(Tokenizer.from_file(tmp_path / "t.json")), cmap)


# ----------------------------------------------------------------------------------------------
# (e) Errors


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"engram.num_embeddings: layer 4 has 221 rows but .* sum to 220"):
        engram_layout(dataclasses.replace(tiny_cfg(10), num_embeddings=(152, 221)))
    with pytest.raises(ConfigError, match=r"engram.compressed_vocab_size=10 but the tokenizer folds to 7 ids"):
        check_compressed_vocab(tiny_cfg(10), np.array([0, 1, 2, 3, 4, 5, 6, 0]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"):
        hash_rows(engram_layout(tiny_cfg(10)), np.arange(8), np.array([[1, 8]]))


def test_generate_needs_the_map_for_an_engram_model():
    mcfg = load_model_config(["configs/model/tiny_v4.yaml"])
    model = types.SimpleNamespace(cfg=dataclasses.replace(mcfg, engram=tiny_cfg(10, layer_ids=(1, 3))))
    with pytest.raises(ValueError, match="engram_map"):
        generate(model, {}, [[1, 2]], 2, eos_id=0)


# ----------------------------------------------------------------------------------------------
# (f) Grain pipeline


def test_pipeline_adds_engram_rows(tok, cmap, tmp_path):
    tok.save(str(tmp_path / "t.json"))
    tokenizer = Tokenizer.from_file(tmp_path / "t.json")
    docs = ["Apple and the apple", "The APPLE é É", "x", "the  end\n\nof Apple pie " * 3]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dcfg = DataConfig(source=str(tmp_path / "c.jsonl"), val_fraction=1e-9, seq_len=16, global_batch_size=3)
    mcfg = load_model_config(["configs/model/tiny_v4.yaml"])
    mcfg = dataclasses.replace(mcfg, engram=tiny_cfg(int(cmap.max()) + 1, layer_ids=(1, 3)))
    engram = data.engram_stage(mcfg.engram, tokenizer)
    assert data.engram_stage(mcfg.engram, tokenizer) is engram  # the map is built once per tokenizer
    layout = engram_layout(mcfg.engram)
    batches = list(data.make_iterator(dcfg, "train", tokenizer, repeat=False, shuffle=False, engram=engram))
    assert len(batches) >= 2 and (batches[-1]["segment_ids"] == 0).any()
    for b in batches:
        assert b["engram_rows"].dtype == np.int32 and b["engram_rows"].shape == (3, 16, 2, 4)
        np.testing.assert_array_equal(b["engram_rows"], hash_rows(layout, cmap, b["tokens"], b["segment_ids"]))
    assert (np.diff(batches[0]["segment_ids"], axis=1) != 0).any()  # a packed document boundary
    pad = data.padding_batch(dcfg, 1, tokenizer.pad_id, engram)
    np.testing.assert_array_equal(pad["engram_rows"], hash_rows(layout, cmap, pad["tokens"], pad["segment_ids"]))
    plain = next(data.make_iterator(dcfg, "train", tokenizer, repeat=False, shuffle=False))
    assert "engram_rows" not in plain and "engram_rows" not in data.padding_batch(dcfg, 1, 0)
    assert data.engram_stage(None, tokenizer) is None
    with pytest.raises(ConfigError, match="engram.compressed_vocab_size=5 but the tokenizer folds to"):
        data.engram_stage(dataclasses.replace(mcfg.engram, compressed_vocab_size=5), tokenizer)
