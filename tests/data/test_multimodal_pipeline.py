"""The media-record pipeline (data/media_records.py, data/media_pack.py): rows by hand, budgets, errors
naming "file:line" (also from a worker process), skip counts, exact resume, JSONL = ArrayRecord, splits,
padding batches, batch specs, and the `data.media` config checks. Media files are synthesised here (Pillow,
numpy, the stdlib `wave`)."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_jax import data
from deepseek_jax.config import (
    AudioConfig,
    Config,
    ConfigError,
    DataConfig,
    EngramConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    VideoConfig,
    VisionConfig,
    build,
    check_config,
)
from deepseek_jax.config.run import MediaDataConfig
from deepseek_jax.data import DataError, Tokenizer
from deepseek_jax.data.pipeline import EngramRows
from deepseek_jax.engram_hash import engram_layout, hash_rows
from deepseek_jax.media.audio import load_wav, log_mel
from deepseek_jax.media.image import load_image, preprocess_image, unshuffle_index
from tests.utils import wav_bytes, whitespace_words

ALL_TRAIN = 1e-9  # val_fraction that puts every record in train
IMG, VID, AUD = 60, 61, 62  # placeholder ids
MODEL = ModelConfig(
    vocab_size=64, dim=16, inter_dim=32, n_layers=1, n_dense_layers=1,
    mla=MLAConfig(n_heads=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    moe=MoEConfig(n_routed_experts=2, n_activated_experts=1, moe_inter_dim=8),
    # an 8×8 image: 4×4 ViT patches of 2×2, a 2×2 LLM grid (span 8 = max_image_tokens)
    vision=VisionConfig(image_token_id=IMG, hidden_size=16, num_heads=2, intermediate_size=16, num_layers=1,
                        patch_size=2, downsample_ratio=2, min_pixels=16, max_image_tokens=8),
    video=VideoConfig(video_token_id=VID, fps=10, max_frames=4, frame_max_tokens=4),  # 8×8 frames: 1×1 grids
    # 0.1 s at 4 kHz: 1 + 400 // 32 = 13 log-mel frames -> ceil(13 / 4) = 4 tokens
    audio=AudioConfig(audio_token_id=AUD, sample_rate=4000, n_fft=64, hop_length=32, n_mels=8, fmax=2000.0,
                      conv_channels=8, max_seconds=0.5),
)
BUDGET = MediaDataConfig(max_image_rows=8, max_patches=32, max_audio_clips=2, max_audio_frames=16)
IMAGE_SPAN = [0, 1, 1, 2, 1, 1, 2, 3]  # START, (IMAGE × 2, NEWLINE) × 2, END
AUDIO_SPAN = [7, 8, 8, 8, 8, 9]
VIDEO_SPAN = [4, 5, 1, 2, 5, 1, 2, 5, 1, 2, 6]  # START, 3 × (FRAME, IMAGE, NEWLINE), END

R_IMAGE = {"segments": [{"text": "w1 w2", "loss": False}, {"image": "a.png"}, {"text": "w3"}]}
R_AUDIO = {"segments": [{"text": "w4"}, {"audio": "a.wav"}, {"text": "w5 w6"}]}
R_VIDEO = {"segments": [{"video": "v.gif"}, {"text": "w7"}]}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """a.png (8×8 RGB), a.wav (0.1 s, 4 kHz, 16-bit), v.gif (3 frames of 8×8, 100 ms), bad.png, tok.json."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (root / "a.wav").write_bytes(wav_bytes((np.sin(np.arange(400) * 0.3) * 10000).astype("<i2"), 4000))
    frames = [Image.fromarray(np.full((8, 8), 60 * i, np.uint8)) for i in range(3)]
    frames[0].save(root / "v.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    vocab = {"<|endoftext|>": 0, **{f"w{k}": k + 1 for k in range(30)}, "<unk>": 31}  # wK = K + 1
    tok = whitespace_words(vocab)
    tok.save(str(root / "tok.json"))
    return root


@pytest.fixture(scope="module")
def tok(media_dir) -> Tokenizer:
    return Tokenizer.from_file(media_dir / "tok.json")


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".array_record":
        from array_record.python.array_record_module import ArrayRecordWriter

        w = ArrayRecordWriter(str(path), "group_size:1")
        for r in records:
            w.write(json.dumps(r).encode())
        w.close()
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(source: Path, media=BUDGET, **kw) -> DataConfig:
    kw = {"seq_len": 32, "global_batch_size": 2, "val_fraction": ALL_TRAIN, "tokenizer": "unused", **kw}
    return DataConfig(source=str(source), media=media, **kw)


def iterator(cfg, tok, **kw):
    return data.make_iterator(cfg, "train", tok, model=MODEL, shuffle=False, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def record_lengths(batch) -> list[list[int]]:
    """Per row: the lengths of its segments (records) in order."""
    seg = batch["segment_ids"]
    return [[int((s == k).sum()) for k in range(1, s.max() + 1)] for s in seg]


def test_rows_by_hand(media_dir, tok):
    src = write_records(media_dir / "hand.jsonl", [R_IMAGE, R_AUDIO, R_VIDEO])
    b = next(iterator(config(src), tok))
    # row 0: the image record (12 positions) then the audio record (10); the video record (13) does not fit
    want_tokens = [2, 3] + [IMG] * 8 + [4, 0] + [5] + [AUD] * 6 + [6, 7, 0]
    want_slots = [-1, -1] + IMAGE_SPAN + [-1, -1, -1] + AUDIO_SPAN + [-1, -1, -1]
    np.testing.assert_array_equal(b["tokens"][0], want_tokens + [tok.pad_id] * 10)
    np.testing.assert_array_equal(b["media_slots"][0], want_slots + [-1] * 10)
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 12 + [2] * 10 + [0] * 10)
    np.testing.assert_array_equal(b["positions"][0], [*range(12), *range(10)] + [0] * 10)
    # targets: w3 and eos after the image (the prompt w1 w2 has loss false), w5 w6 eos after the audio
    np.testing.assert_array_equal(np.flatnonzero(b["loss_mask"][0]), [9, 10, 18, 19, 20])
    rows = np.zeros(32, int)
    rows[[3, 4, 6, 7]] = [0, 1, 2, 3]  # the image's aligner rows, reading order
    rows[14:18] = 8 + np.arange(4)  # AUDIO: M + clip·n_tokens(F) + j, M = max_image_rows = 8
    np.testing.assert_array_equal(b["media_rows"][0], rows)
    patches, grid = preprocess_image(load_image(media_dir / "a.png", "a.png"), MODEL.vision)
    assert grid == (4, 4)
    np.testing.assert_array_equal(b["patches"][0, :16], patches)
    np.testing.assert_array_equal(b["patch_pic"][0], [0] * 16 + [-1] * 16)
    np.testing.assert_array_equal(b["patch_pos"][0, :16], [(i // 4, i % 4) for i in range(16)])
    np.testing.assert_array_equal(b["unshuffle"][0], np.concatenate([unshuffle_index(4, 4, 2), -np.ones((4, 4))]))
    mel = log_mel(load_wav(media_dir / "a.wav", "a.wav", 4000), MODEL.audio)
    np.testing.assert_array_equal(b["mel_len"][0], [13, 0])
    np.testing.assert_array_equal(b["mel"][0, 0, :13], mel)
    assert not b["mel"][0, 0, 13:].any() and not b["mel"][0, 1].any()
    # row 1: the video record, then the image record again (the stream repeats)
    np.testing.assert_array_equal(b["media_slots"][1, :25], VIDEO_SPAN + [-1, -1, -1, -1] + IMAGE_SPAN + [-1, -1])
    np.testing.assert_array_equal(b["tokens"][1, :13], [VID] * 11 + [8, 0])
    rows = np.zeros(32, int)
    rows[[1, 4, 7]] = [0, 1, 2]  # FRAME: frame number
    rows[[2, 5, 8]] = [0, 1, 2]  # each frame's one aligner row
    rows[[16, 17, 19, 20]] = [3, 4, 5, 6]  # the image after the 3 frames
    np.testing.assert_array_equal(b["media_rows"][1], rows)
    np.testing.assert_array_equal(np.flatnonzero(b["loss_mask"][1]), [10, 11, 22, 23])


def test_loss_mask_and_engram_dead_mask(media_dir, tok):
    """loss_mask against its definition (target t+1 is loss text of the same record), and Engram rows hashed
    with media spans dead: a text n-gram never reads a placeholder."""
    src = write_records(media_dir / "mix.jsonl", [R_AUDIO, R_IMAGE, R_VIDEO, R_IMAGE, R_AUDIO] * 2)
    cmap = np.arange(64)
    engram = EngramRows(engram_layout(EngramConfig(
        layer_ids=(1, 4), num_embeddings=(152, 220), max_ngram_size=3, n_heads=2, head_dim=32, vocab_size=31,
        compressed_vocab_size=64, pad_id=0)), cmap)
    for b in take(iterator(config(src, seq_len=40), tok, engram=engram), 3):
        seg, slots = b["segment_ids"], b["media_slots"]
        # text of a loss segment = text that is not w1 / w2 (the only loss-false prompt) and not padding
        loss_text_BT = (slots == -1) & (seg > 0) & ~np.isin(b["tokens"], [2, 3])
        want = np.zeros_like(b["loss_mask"])
        want[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & loss_text_BT[:, 1:]
        np.testing.assert_array_equal(b["loss_mask"], want)
        np.testing.assert_array_equal(b["engram_rows"], hash_rows(engram.layout, cmap, b["tokens"], seg, slots >= 0))
        assert (b["engram_rows"] != hash_rows(engram.layout, cmap, b["tokens"], seg)).any()  # the mask matters


def test_budgets_hold_and_rows_are_greedy(media_dir, tok):
    """Rows take whole records in order while tokens, image rows, patches and clips fit (an independent
    greedy packing of the known costs), and every row stays within every budget."""
    records = [R_IMAGE, R_IMAGE, R_AUDIO, R_AUDIO, R_IMAGE, R_VIDEO, R_AUDIO, R_IMAGE]
    # (tokens, image rows, patches, clips) per record; the video has 3 frames of 2×2 patches, 1 row each
    cost = {"i": (12, 4, 16, 0), "a": (10, 0, 0, 1), "v": (13, 3, 12, 0)}
    kinds = "iiaaivai"
    media = MediaDataConfig(max_image_rows=8, max_patches=28, max_audio_clips=1, max_audio_frames=16)
    src = write_records(media_dir / "budget.jsonl", records)
    limits = (64, 8, 28, 1)
    want, row, used = [], [], np.zeros(4, int)
    for k in kinds * 2:
        if (used + cost[k] > limits).any():
            want.append(row)
            row, used = [], np.zeros(4, int)
        row.append(cost[k][0])
        used += cost[k]
    batches = take(iterator(config(src, media, seq_len=64), tok), 4)
    got = [r for b in batches for r in record_lengths(b)]
    n = min(len(got), len(want))
    assert n >= 6 and got[:n] == want[:n]
    for b in batches:
        assert ((b["media_slots"] == 1).sum(1) <= 8).all() and ((b["patch_pic"] >= 0).sum(1) <= 28).all()
        assert ((b["mel_len"] > 0).sum(1) <= 1).all()


def test_record_over_a_budget_is_an_error_or_a_counted_skip(media_dir, tok):
    long_text = {"segments": [{"text": " ".join(["w1"] * 40)}]}
    src = write_records(media_dir / "long.jsonl", [R_AUDIO, long_text, R_IMAGE])
    with pytest.raises(DataError, match=r"long\.jsonl:2.*seq_len"):
        take(iterator(config(src), tok), 2)
    small = MediaDataConfig(max_image_rows=3, max_patches=32, max_audio_clips=2, max_audio_frames=16)
    with pytest.raises(DataError, match=r"long\.jsonl:3.*max_image_rows"):  # (checks skipped: 4 rows > 3)
        take(iterator(config(src, small, seq_len=64), tok), 2)
    skip = MediaDataConfig(**{**BUDGET.__dict__, "skip_bad_records": True, "max_skipped_fraction": 0.5})
    it = iterator(config(src, skip, global_batch_size=1, seq_len=24), tok)
    b = take(it, 2)
    assert [record_lengths(x) for x in b] == [[[10, 12]], [[10, 12]]] and it.skipped_records == 2


def test_corrupt_media_names_the_record(media_dir, tok):
    bad = {"segments": [{"text": "w1"}, {"image": "bad.png"}]}
    src = write_records(media_dir / "bad.jsonl", [R_AUDIO, R_IMAGE, bad, R_VIDEO])
    with pytest.raises(DataError, match=r"bad\.jsonl:3") as e:
        take(iterator(config(src), tok), 3)
    assert "bad.png" in str(e.value)
    skip = MediaDataConfig(**{**BUDGET.__dict__, "skip_bad_records": True, "max_skipped_fraction": 0.01})
    it = iterator(config(src, skip), tok)
    take(it, 1)  # rows [audio, image] (the bad record skipped), [video, audio]
    assert it.skipped_records == 1
    with pytest.raises(DataError, match=r"2 of 7 media records skipped.*bad\.jsonl:3"):
        take(it, 1)  # 2 > 1% of 100: the second pass's skip stops
    src = write_records(media_dir / "badjson.jsonl", [R_AUDIO])
    src.write_text(src.read_text() + '{"segments": [\n')
    with pytest.raises(DataError, match=r"badjson\.jsonl:2 is not valid JSON"):
        take(iterator(config(src), tok), 2)


@pytest.mark.slow  # a spawned Grain worker: a few seconds of start-up
def test_corrupt_media_from_a_worker_process(media_dir, tok):
    bad = {"segments": [{"text": "w1"}, {"image": "bad.png"}]}
    src = write_records(media_dir / "bad_w.jsonl", [R_AUDIO, bad, R_VIDEO])
    it = iterator(config(src, worker_count=1), tok)
    with pytest.raises(DataError, match=r"bad_w\.jsonl:2.*bad\.png"):
        take(it, 3)
    it.close()


def check_resume(cfg, tok, n_before, n_after=3):
    it = data.make_iterator(cfg, "train", tok, model=MODEL)
    take(it, n_before)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = take(it, n_after)
    fresh = data.make_iterator(cfg, "train", tok, model=MODEL)
    fresh.set_state(state)
    got = take(fresh, n_after)
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert fresh.skipped_records == it.skipped_records
    it.close(), fresh.close()


@pytest.mark.slow  # ~6 s: resumes after 0, 1 and 4 batches (the worker variant below too)
def test_resume_is_exact(media_dir, tok):
    """Shuffled and repeated, with a record waiting for the next row at most cuts and skips counted."""
    bad = {"segments": [{"image": "bad.png"}]}
    src = write_records(media_dir / "resume.jsonl", [R_IMAGE, R_AUDIO, R_VIDEO, bad, R_AUDIO, R_IMAGE, R_VIDEO])
    skip = MediaDataConfig(**{**BUDGET.__dict__, "skip_bad_records": True, "max_skipped_fraction": 0.5})
    for n_before in (0, 1, 4):
        check_resume(config(src, skip), tok, n_before)


@pytest.mark.slow  # a spawned Grain worker
def test_resume_is_exact_with_a_worker(media_dir, tok):
    src = write_records(media_dir / "resume_w.jsonl", [R_IMAGE, R_AUDIO, R_VIDEO, R_AUDIO, R_IMAGE])
    check_resume(config(src, worker_count=1), tok, n_before=3)


def test_jsonl_and_array_record_give_the_same_batches(media_dir, tok, tmp_path):
    records = [R_IMAGE, R_AUDIO, R_VIDEO, R_AUDIO]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for name in ("a.png", "a.wav", "v.gif"):
        for sub in "ab":
            (tmp_path / sub / name).write_bytes((media_dir / name).read_bytes())
    jl = write_records(tmp_path / "a" / "r.jsonl", records)
    ar = write_records(tmp_path / "b" / "r.array_record", records)
    want, got = take(iterator(config(jl), tok), 3), take(iterator(config(ar), tok), 3)
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_splits(media_dir, tmp_path):
    """By the text rule (sha1 of "file:line" < val_fraction), or by `train` / `validation` file names."""
    write_records(tmp_path / "r.jsonl", [R_AUDIO] * 40)
    for name in ("a.png", "a.wav"):  # media files in the folder are not record files
        (tmp_path / name).write_bytes((media_dir / name).read_bytes())
    cfg = config(tmp_path, val_fraction=0.3)
    train, val = (data.list_records(cfg, s).names for s in ("train", "validation"))
    assert sorted(train + val, key=lambda n: int(n.split(":")[1])) == [f"r.jsonl:{i}" for i in range(1, 41)]
    assert 3 < len(val) < 25 and not set(train) & set(val)
    named = tmp_path / "named"
    named.mkdir()
    write_records(named / "train.jsonl", [R_AUDIO] * 3), write_records(named / "validation.jsonl", [R_IMAGE] * 2)
    cfg = config(named, val_fraction=0.5)
    assert data.list_records(cfg, "train").names == [f"train.jsonl:{i}" for i in (1, 2, 3)]
    assert data.list_records(cfg, "validation").names == ["validation.jsonl:1", "validation.jsonl:2"]
    with pytest.raises(DataError, match="no record files"):
        data.list_records(config(media_dir / "a.png"), "train")


def test_validation_pass_and_padding_batch(media_dir, tok, tmp_path):
    write_records(tmp_path / "train.jsonl", [R_AUDIO]), write_records(tmp_path / "validation.jsonl", [R_IMAGE] * 3)
    for name in ("a.png", "a.wav"):
        (tmp_path / name).write_bytes((media_dir / name).read_bytes())
    cfg = config(tmp_path, global_batch_size=4, seq_len=24)
    batches = list(data.make_iterator(cfg, "validation", tok, model=MODEL))
    assert [record_lengths(b) for b in batches] == [[[12, 12], [12], [], []]]  # one pass; padding rows
    pad = data.padding_batch(cfg, 2, tok.pad_id, model=MODEL)
    b = batches[0]
    assert pad.keys() == b.keys()
    for k in b:
        assert pad[k].shape == (2, *b[k].shape[1:]) and pad[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(pad[k][0], b[k][3], err_msg=k)  # = a padding row of a real batch
    assert (pad["media_slots"] == -1).all() and (pad["patch_pic"] == -1).all() and not pad["mel_len"].any()
    assert not pad["loss_mask"].any() and not pad["segment_ids"].any()


@pytest.mark.multidevice
def test_media_arrays_are_batch_sharded_like_the_tokens(media_dir, tok):
    """batch_specs lists every array of a real batch at [B, ...] in the batch sharding, and put_batch splits
    the rank-3/4 media arrays over the 8 devices by rows, as it does the tokens."""
    from deepseek_jax.config import MeshConfig
    from deepseek_jax.multihost import put_batch
    from deepseek_jax.program import Program
    from deepseek_jax.sharding import batch_sharding, make_mesh

    src = write_records(media_dir / "shard.jsonl", [R_IMAGE, R_AUDIO, R_VIDEO])
    cfg = Config(model=MODEL, data=config(src, global_batch_size=8))
    sharding = batch_sharding(make_mesh(MeshConfig()), ())  # no rules: B over all 8 devices
    specs = Program.batch_specs(types.SimpleNamespace(cfg=cfg, batch_sharding=sharding))
    batch = next(iterator(cfg.data, tok))
    assert specs.keys() == batch.keys()
    for k, v in batch.items():
        assert specs[k].shape == v.shape and specs[k].dtype == v.dtype and specs[k].sharding == sharding, k
    placed = put_batch(batch, sharding)
    for k in ("tokens", "patches", "unshuffle", "mel"):
        shards = sorted(placed[k].addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and all(s.data.shape == (1, *batch[k].shape[1:]) for s in shards), k
        np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), batch[k])


def test_budget_defaults_and_config_checks():
    got = MediaDataConfig().budgets(MODEL, 32)  # r = 2; audio strides 2·2; 0.5 s = 63 frames = 16 tokens
    assert MODEL.audio.max_frames == 63
    assert got == {"max_patches": 4 * 29, "max_image_rows": 29, "max_audio_clips": 32 // (16 + 2),
                   "max_audio_frames": 63}
    assert MediaDataConfig().budgets(MODEL, 8)["max_audio_frames"] == 6 * 4  # cut to what fits a row
    base = {"model": to_plain(MODEL), "data": {"seq_len": 32, "tokenizer": "t.json", "media": {}}}
    check_config(build(Config, base))
    bad = {**base, "data": {**base["data"], "media": {"max_image_rows": 4}}}
    with pytest.raises(ConfigError, match=r"max_image_rows=4 is below 5.*data\.media\.max_image_rows from"):
        check_config(build(Config, bad))
    bad = {**base, "data": {**base["data"], "media": {"max_image_rows": 5, "max_patches": 19}}}
    with pytest.raises(ConfigError, match="max_patches=19 is below 20"):
        check_config(build(Config, bad))
    text_only = {k: v for k, v in base["model"].items() if k not in ("vision", "video", "audio")}
    with pytest.raises(ConfigError, match="needs a model with model.vision"):
        check_config(build(Config, {**base, "model": text_only}))
    bpe = {**base, "data": {"seq_len": 32, "media": {}, "tokenizer_vocab_size": 259}}  # "" = train a BPE
    with pytest.raises(ConfigError, match="fall inside the BPE"):  # ids 60-62 would be BPE tokens too
        check_config(build(Config, bpe))
    with pytest.raises(ConfigError, match="max_skipped_fraction"):
        MediaDataConfig(max_skipped_fraction=1.5)


def to_plain(cfg):
    from deepseek_jax.config import to_dict

    return to_dict(cfg)


def test_demo_media_source_reads_the_demo_folder(media_dir, tok, tmp_path, monkeypatch):
    """`data.source: demo_media` asks data.demo_media.demo_records for its folder (lazily) and reads it."""
    from deepseek_jax.data import demo_media

    write_records(tmp_path / "train.jsonl", [R_AUDIO] * 2), write_records(tmp_path / "validation.jsonl", [R_IMAGE])
    calls = []
    monkeypatch.setattr(demo_media, "demo_records", lambda m: calls.append(m) or tmp_path)
    cfg = config("demo_media")
    assert data.list_records(cfg, "validation", MODEL).names == ["validation.jsonl:1"]
    assert calls == [MODEL]
    with pytest.raises(DataError, match="needs the model config"):
        data.list_records(cfg, "train")


def test_a_modality_the_model_lacks_names_the_record(media_dir, tok):
    import dataclasses

    src = write_records(media_dir / "noaudio.jsonl", [R_IMAGE, R_AUDIO])
    it = data.make_iterator(config(src), "train", tok, model=dataclasses.replace(MODEL, audio=None), shuffle=False)
    with pytest.raises(DataError, match=r"noaudio\.jsonl:2 segment 1.*no `audio` config"):
        next(it)
