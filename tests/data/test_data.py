"""Data pipeline: documents, splits, tokenizer, packing, sharding, resume, errors, baseline."""

import json
import math

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from deepseek_jax import data, tokenizer
from deepseek_jax.config import DataConfig
from deepseek_jax.data import DataError, Tokenizer

ALL_TRAIN = 1e-9  # val_fraction that puts every document in train (sha1 fraction < 1e-9: never)
WORDS = [
    "def",
    "class",
    "return",
    "import",
    "self",
    "value",
    "index",
    "result",
    "list",
    "dict",
    "print",
    "yield",
    "lambda",
    "async",
    "await",
    "with",
    "open",
    "read",
    "write",
    "close",
]


def word_tokenizer(tmp_path, n_words=64) -> Tokenizer:
    """Whitespace word-level tokenizer: `<|endoftext|>` = 0, `wK` = K + 1; ids are checkable by hand."""
    vocab = {"<|endoftext|>": 0, **{f"w{k}": k + 1 for k in range(n_words)}, "<unk>": n_words + 1}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "words.json"
    tok.save(str(path))
    return Tokenizer.from_file(path)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def prose(n_docs, seed=0, n_words=40):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, n_words)) + "\n" for _ in range(n_docs)]


def batches(it, n=None):
    """The first n batches, or all of them (the iterator must not repeat)."""
    return list(it) if n is None else [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Packing


def test_packing_by_hand(tmp_path):
    """[a b c E][d e E f][g h i j] | [k E _ _] + 2 padding rows; E = eos = pad = 0."""
    write_jsonl(tmp_path / "c.jsonl", ["w0 w1 w2", "w3 w4", "w5 w6 w7 w8 w9 w10"])
    cfg = DataConfig(
        source=str(tmp_path / "c.jsonl"), val_fraction=ALL_TRAIN, seq_len=4, global_batch_size=3
    )
    got = batches(
        data.make_iterator(cfg, "train", word_tokenizer(tmp_path), repeat=False, shuffle=False)
    )
    assert len(got) == 2
    np.testing.assert_array_equal(
        np.concatenate([b["tokens"] for b in got]),
        [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10], [11, 0, 0, 0], [0] * 4, [0] * 4],
    )
    np.testing.assert_array_equal(
        np.concatenate([b["segment_ids"] for b in got]),
        [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0], [0] * 4, [0] * 4],
    )
    np.testing.assert_array_equal(
        np.concatenate([b["positions"] for b in got]),
        [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0], [0] * 4, [0] * 4],
    )
    np.testing.assert_array_equal(
        np.concatenate([b["loss_mask"] for b in got]),
        [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0] * 4, [0] * 4],
    )


def test_shapes_dtypes_and_mask_invariants(tmp_path):
    texts = [" ".join(f"w{k % 60}" for k in range(i, i + 3 + 7 * i % 50)) for i in range(30)]
    write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = DataConfig(
        source=str(tmp_path / "c.jsonl"), val_fraction=0.2, seq_len=16, global_batch_size=4
    )
    tok = word_tokenizer(tmp_path)
    for b in batches(data.make_iterator(cfg, "validation", tok)):  # ends with a padded batch
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "tokens": ((4, 16), np.int32),
            "positions": ((4, 16), np.int32),
            "segment_ids": ((4, 16), np.int32),
            "loss_mask": ((4, 16), np.float32),
        }
        seg, mask = b["segment_ids"], b["loss_mask"].astype(bool)
        assert not mask[:, -1].any() and not mask[seg == 0].any()
        assert (
            seg[:, :-1][mask[:, :-1]] == seg[:, 1:][mask[:, :-1]]
        ).all()  # no target crosses docs
        assert (b["tokens"][seg == 0] == tok.pad_id).all()
        starts = np.diff(seg, prepend=0, axis=1) != 0  # a segment starts at position 0, then counts
        assert (b["positions"][starts & (seg > 0)] == 0).all()
        inner = ~starts & (seg > 0)
        assert (
            b["positions"][:, 1:][inner[:, 1:]] == b["positions"][:, :-1][inner[:, 1:]] + 1
        ).all()


# ----------------------------------------------------------------------------------------------
# Documents and splits


def test_formats_and_split(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    (tmp_path / "sub").mkdir()
    for i in range(20):
        (tmp_path / "sub" / f"f{i:02d}.txt").write_text(f"text file {i}")
    (tmp_path / "blank.txt").write_text("  \n")  # blank documents are dropped
    (tmp_path / ".hidden.txt").write_text("hidden files are skipped")
    write_jsonl(tmp_path / "lines.jsonl", [f"line {i}" for i in range(20)], field="body")
    writer = ArrayRecordWriter(str(tmp_path / "recs.array_record"), "group_size:1")
    for i in range(20):
        writer.write(f"record {i}".encode())
    writer.close()
    cfg = DataConfig(source=str(tmp_path), jsonl_field="body", val_fraction=0.3)
    train, val = data.list_documents(cfg, "train"), data.list_documents(cfg, "validation")
    assert len(train) + len(val) == 60 and not set(train.names) & set(val.names)
    assert 5 < len(val) < 35
    texts = sorted(list(train) + list(val))
    assert texts == sorted(
        [f"text file {i}" for i in range(20)]
        + [f"line {i}" for i in range(20)]
        + [f"record {i}" for i in range(20)]
    )
    assert (
        "lines.jsonl:3" in train.names + val.names
        and "recs.array_record:0" in train.names + val.names
    )
    # adding files moves no existing document between splits
    (tmp_path / "sub" / "new.txt").write_text("a new file")
    again = data.list_documents(cfg, "validation")
    assert set(val.names) <= set(again.names) and len(again) - len(val) in (0, 1)


def test_glob_and_max_documents(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.py").write_text(f"x = {i}")
        (tmp_path / f"{i}.md").write_text(f"# {i}")
    cfg = DataConfig(source=str(tmp_path / "*.py"), val_fraction=ALL_TRAIN, max_documents=4)
    docs = data.list_documents(cfg, "train")
    assert docs.names == ["0.py", "1.py", "2.py", "3.py"] and docs[3] == "x = 3"


def test_stdlib_source(tmp_path):
    cfg = DataConfig(max_documents=12, val_fraction=0.3, tokenizer_vocab_size=300, seq_len=32)
    docs = data.list_documents(cfg, "train")
    assert all(n.endswith(".py") and "site-packages" not in n for n in docs.names)
    tok = data.load_tokenizer(cfg, tmp_path, model_vocab_size=512)
    b = next(data.make_iterator(cfg, "train", tok))
    assert b["tokens"].shape == (8, 32) and b["tokens"].max() < tok.vocab_size
    assert 0 < data.unigram_baseline(cfg, tok) <= math.log(tok.vocab_size)


# ----------------------------------------------------------------------------------------------
# Order: shuffle, sharding, resume


@pytest.fixture
def word_corpus(tmp_path):
    """60 two-token documents `wK E`, so each document is identified by its first token."""
    write_jsonl(tmp_path / "c.jsonl", [f"w{k}" for k in range(60)])
    cfg = DataConfig(
        source=str(tmp_path / "c.jsonl"), val_fraction=0.25, seq_len=8, global_batch_size=4
    )
    return cfg, word_tokenizer(tmp_path)


def doc_ids(bs):
    toks = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in bs])
    return [int(t) for t in toks if t != 0]


def test_shuffle_is_seeded(word_corpus):
    cfg, tok = word_corpus
    order = lambda seed: doc_ids(
        batches(
            data.make_iterator(
                DataConfig(**{**cfg.__dict__, "seed": seed}), "train", tok, repeat=False
            )
        )
    )
    plain = doc_ids(batches(data.make_iterator(cfg, "train", tok, repeat=False, shuffle=False)))
    assert order(0) == order(0) and sorted(order(0)) == sorted(plain)
    assert order(0) != order(1) and order(0) != plain
    # validation never shuffles
    val = lambda seed: doc_ids(
        batches(data.make_iterator(DataConfig(**{**cfg.__dict__, "seed": seed}), "validation", tok))
    )
    assert val(0) == val(1) == sorted(val(0))


def test_process_shards_are_disjoint_and_cover(word_corpus):
    cfg, tok = word_corpus
    shares = [
        doc_ids(
            batches(
                data.make_iterator(
                    cfg, "train", tok, process_index=p, process_count=2, repeat=False
                )
            )
        )
        for p in range(2)
    ]
    first = next(data.make_iterator(cfg, "train", tok, process_index=1, process_count=2))
    assert first["tokens"].shape == (2, 8)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(
        doc_ids(batches(data.make_iterator(cfg, "train", tok, repeat=False)))
    )
    with pytest.raises(DataError, match="global_batch_size=4 must split evenly over 3"):
        data.make_iterator(cfg, "train", tok, process_count=3)


def test_repeat_reshuffles_each_epoch(word_corpus):
    cfg, tok = word_corpus
    cfg = DataConfig(**{**cfg.__dict__, "shuffle_window": 0})  # rows in document order
    n = len(data.list_documents(cfg, "train"))
    ids = doc_ids(batches(data.make_iterator(cfg, "train", tok), n=n // 4 * 2 + 2))
    assert sorted(ids[:n]) == sorted(ids[n : 2 * n]) and ids[:n] != ids[n : 2 * n]


def check_resume(cfg, tok, n_before=3, n_after=4):
    it = data.make_iterator(cfg, "train", tok)
    batches(it, n_before)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = batches(it, n_after)
    fresh = data.make_iterator(cfg, "train", tok)
    fresh.set_state(state)
    got = batches(fresh, n_after)
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    it.close(), fresh.close()


@pytest.mark.slow  # ~8 s: 7 resumes, one after 70 batches
def test_state_restore_is_exact(tmp_path):
    """Documents longer than a row, so the state holds a half-packed document."""
    texts = [" ".join(f"w{(i + j) % 60}" for j in range(5 + 11 * i % 37)) for i in range(40)]
    write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = DataConfig(
        source=str(tmp_path / "c.jsonl"), seq_len=8, global_batch_size=2, val_fraction=0.1
    )
    tok = word_tokenizer(tmp_path)
    for n_before in (0, 1, 5, 70):  # 70 batches (1120 tokens) pass the first epoch (~800)
        check_resume(cfg, tok, n_before)
    for n_before in (2, 3, 9):  # a state taken in the middle of a row-shuffle window
        check_resume(DataConfig(**{**cfg.__dict__, "shuffle_window": 5}), tok, n_before)
    it = data.make_iterator(cfg, "train", tok)
    with pytest.raises(DataError, match="seq_len 8 -> 16"):
        data.make_iterator(DataConfig(**{**cfg.__dict__, "seq_len": 16}), "train", tok).set_state(
            it.get_state()
        )


@pytest.mark.slow
def test_state_restore_with_workers(tmp_path):
    """Two Grain worker processes (spawned: a few seconds of start-up each)."""
    write_jsonl(
        tmp_path / "c.jsonl",
        [" ".join(f"w{(i * j) % 60}" for j in range(i % 13 + 1)) for i in range(60)],
    )
    cfg = DataConfig(
        source=str(tmp_path / "c.jsonl"),
        seq_len=8,
        global_batch_size=2,
        val_fraction=0.1,
        worker_count=2,
    )
    check_resume(cfg, word_tokenizer(tmp_path), n_before=5)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_trained_once_and_cached(tmp_path, monkeypatch):
    src = tmp_path / "corpus"
    src.mkdir()
    for i, text in enumerate(prose(40)):
        (src / f"{i}.txt").write_text(text)
    cfg = DataConfig(source=str(src), tokenizer_vocab_size=300)
    run = tmp_path / "run"
    tok = data.load_tokenizer(cfg, run, model_vocab_size=300)
    assert (tok.path, tok.vocab_size, tok.eos_id, tok.pad_id) == (run / "tokenizer.json", 300, 0, 0)
    data.load_tokenizer(cfg, tmp_path / "again", 300)  # training is deterministic
    assert (tmp_path / "again" / "tokenizer.json").read_text() == tok.path.read_text()
    text = "def yield lambda é ∑ <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text and tok.eos_id not in tok.encode(text)
    assert tok.encode_batch([text, "self"]) == [tok.encode(text), tok.encode("self")]

    def no_training(*args):
        raise AssertionError("retrained")

    monkeypatch.setattr(tokenizer, "train_bpe", no_training)
    assert data.load_tokenizer(cfg, run, 300).encode(text) == tok.encode(text)
    bigger = DataConfig(source=str(src), tokenizer_vocab_size=320)
    with pytest.raises(DataError, match=r"cached tokenizer .*run/tokenizer.json has 300 .* is 320"):
        data.load_tokenizer(bigger, run, 512)
    with pytest.raises(
        DataError, match=r"tokenizer .*tokenizer.json has 300 tokens.*model.vocab_size=299"
    ):
        data.load_tokenizer(cfg, run, 299)
    given = DataConfig(source=str(src), tokenizer=str(run / "tokenizer.json"))
    assert data.load_tokenizer(given, tmp_path / "other", 300).vocab_size == 300
    monkeypatch.undo()
    # too little text for the vocabulary asked for
    with pytest.raises(
        DataError, match="only supports .* fewer than data.tokenizer_vocab_size=4000"
    ):
        data.load_tokenizer(
            DataConfig(source=str(src), tokenizer_vocab_size=4000), tmp_path / "r2", 5000
        )


def test_tokenizer_file_errors(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ["w1"])
    missing = DataConfig(source=str(tmp_path / "c.jsonl"), tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="nope.json does not exist"):
        data.load_tokenizer(missing, tmp_path, 1000)
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match="no_eos.json has no end-of-text token"):
        Tokenizer.from_file(tmp_path / "no_eos.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json could not be loaded"):
        Tokenizer.from_file(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------
# Errors


def test_source_errors(tmp_path):
    list_train = lambda **kw: data.list_documents(DataConfig(**kw), "train")
    with pytest.raises(DataError, match="data.source '.*missing' does not exist"):
        list_train(source=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"empty'.*no documents found \(1 files, all empty\)"):
        list_train(source=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"\*.zzz'.*no documents found \(no files match\)"):
        list_train(source=str(tmp_path / "*.zzz"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        list_train(source=str(tmp_path / "bad.jsonl"))
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(DataError, match="field.jsonl line 3 has no field 'text'"):
        list_train(source=str(tmp_path / "field.jsonl"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="bin.txt is not UTF-8"):
        list_train(source=str(tmp_path / "bin.txt"))
    write_jsonl(tmp_path / "few.jsonl", ["one", "two", "three"])
    with pytest.raises(
        DataError, match=r"validation split of data.source '.*few.jsonl' is empty.*3 doc"
    ):
        data.list_documents(
            DataConfig(source=str(tmp_path / "few.jsonl"), val_fraction=ALL_TRAIN), "validation"
        )


# ----------------------------------------------------------------------------------------------
# Baseline


def test_unigram_baseline(word_corpus, tmp_path):
    cfg, tok = word_corpus
    V = tok.vocab_size
    train = [int(d[1:]) + 1 for d in data.list_documents(cfg, "train")]
    val = [int(d[1:]) + 1 for d in data.list_documents(cfg, "validation")]
    counts = np.bincount(train + [0] * len(train), minlength=V)  # each document ends in eos = 0
    log_p = np.log(counts + 1) - np.log(counts.sum() + V)
    want = -np.mean(log_p[val + [0] * len(val)])
    got = data.unigram_baseline(cfg, tok)
    assert got == pytest.approx(want, rel=1e-9) and 0 < got <= math.log(V)
