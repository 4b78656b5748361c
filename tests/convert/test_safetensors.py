"""Our safetensors reader/writer: bit-exact round trips of every dtype, agreement with the stock
`safetensors` numpy and torch loaders, sharding + index, streaming order, and every damaged-file error."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.safetensors import (
    DTYPES,
    INDEX_NAME,
    SafetensorsDir,
    TensorInfo,
    plan_shards,
    write_file,
    write_sharded,
)

RNG = np.random.default_rng(0)


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values of `dtype`; floats get random bit patterns (NaNs, infs, subnormals included)."""
    dt = DTYPES[dtype]
    if dtype == "BOOL":
        return RNG.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return RNG.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    return RNG.integers(0, 256, (*shape, dt.itemsize), dtype=np.uint8).view(dt).reshape(shape)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _raw_file(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _write(tmp_path, tensors: dict, **kw):
    """write_sharded of in-memory arrays; returns the written shard paths."""
    specs = [(n, next(k for k, d in DTYPES.items() if d == a.dtype), a.shape) for n, a in tensors.items()]
    return write_sharded(tmp_path, specs, tensors.__getitem__, **kw)


def test_every_dtype_round_trips_bit_exactly(tmp_path):
    tensors = {f"{d}.{i}": _sample(d, s) for d in DTYPES for i, s in enumerate([(3, 5), (), (0, 4), (2, 3, 7)])}
    tensors["I64.big"] = np.array([2**40 + 3, -(2**62) - 1, 2**63 - 1], np.int64)
    tensors["F8_E8M0.edges"] = np.array([0, 127, 254, 255], np.uint8).view(ml_dtypes.float8_e8m0fnu)
    paths = _write(tmp_path, tensors, max_shard_bytes=200)
    assert len(paths) > 1 and (tmp_path / INDEX_NAME).is_file()
    with SafetensorsDir(tmp_path) as sd:
        assert sd.names() == sorted(tensors) and sd.files() == paths
        assert sd.total_bytes() == sum(a.nbytes for a in tensors.values())
        for name, want in tensors.items():
            got = sd.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)
    assert sd.read("I64.big").tolist() == [2**40 + 3, -(2**62) - 1, 2**63 - 1]  # never via float
    e8m0 = SafetensorsDir(tmp_path).read("F8_E8M0.edges").astype(np.float32)
    assert e8m0[:3].tolist() == [2.0**-127, 1.0, 2.0**127] and np.isnan(e8m0[3])


STOCK_NP = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64"]


def test_reads_files_written_by_stock_safetensors_numpy(tmp_path):
    from safetensors.numpy import save_file

    tensors = {d: _sample(d, (4, 3)) for d in STOCK_NP}
    save_file(tensors, tmp_path / "stock.safetensors", metadata={"format": "np"})
    sd = SafetensorsDir(tmp_path / "stock.safetensors")
    assert sd.metadata() == {"format": "np"}
    for name, want in tensors.items():
        assert sd.read(name).dtype == want.dtype
        np.testing.assert_array_equal(_bits(sd.read(name)), _bits(want), err_msg=name)


def test_stock_safetensors_numpy_loads_our_files(tmp_path):
    from safetensors.numpy import load_file

    tensors = {d: _sample(d, (2, 5)) for d in STOCK_NP} | {"scalar": np.array(7, np.int64)}
    write_file(tmp_path / "ours.safetensors", tensors, metadata={"note": "x"})
    got = load_file(tmp_path / "ours.safetensors")
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(_bits(got[name]), _bits(want), err_msg=name)


def test_stock_safetensors_torch_loads_our_float8_shards(tmp_path):
    """torch has float8_e4m3fn / float8_e8m0fnu, so this proves transformers can read what we write."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {d: _sample(d, (8, 16)) for d in ["F8_E4M3", "F8_E5M2", "F8_E8M0", "BF16", "I64", "F32"]}
    paths = _write(tmp_path, tensors, max_shard_bytes=300)
    assert len(paths) > 1
    want_dtypes = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16}
    got = {}
    for path in paths:
        got |= load_file(path)
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        assert got[name].dtype == want_dtypes.get(name, got[name].dtype)
        np.testing.assert_array_equal(got[name].contiguous().view(torch.uint8).numpy().reshape(-1), _bits(want))


def test_sharding_index_and_cross_shard_lookup(tmp_path):
    tensors = {f"layers.{i}.weight": _sample("F8_E4M3", (10, 10)) for i in range(6)}
    tensors["layers.0.weight_scale_inv"] = _sample("F32", (1, 1))
    paths = _write(tmp_path, tensors, max_shard_bytes=250, metadata={"origin": "test"})
    assert [p.name for p in paths] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 604, "origin": "test"}
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    sd = SafetensorsDir(tmp_path)
    weight, scale = sd.info("layers.0.weight"), sd.info("layers.0.weight_scale_inv")
    assert weight.file != scale.file and weight.file == paths[0] and scale.file == paths[2]
    np.testing.assert_array_equal(sd.read("layers.0.weight_scale_inv"), tensors["layers.0.weight_scale_inv"])
    assert sd.metadata() == index["metadata"] and len(sd) == 7 and "layers.5.weight" in sd


def test_single_file_when_everything_fits_and_stale_index_is_removed(tmp_path):
    _write(tmp_path, {f"w{i}": np.zeros(100, np.float32) for i in range(4)}, max_shard_bytes=500)
    assert (tmp_path / INDEX_NAME).exists()
    paths = _write(tmp_path, {"a": np.arange(6, dtype=np.int32)}, metadata={"k": "v"})
    assert paths == [tmp_path / "model.safetensors"] and not (tmp_path / INDEX_NAME).exists()
    sd = SafetensorsDir(tmp_path)  # the stale shards are ignored: model.safetensors wins over a bare glob
    assert sd.names() == ["a"] and sd.metadata() == {"format": "pt", "k": "v"}
    assert sd.info("a") == TensorInfo("a", paths[0], "I32", (6,), sd.info("a").offset, 24)
    assert sd.info("a").offset % 8 == 0  # header padded to a multiple of 8


def test_plan_shards_starts_a_new_shard_before_overflow():
    assert plan_shards([40, 40, 30, 200, 10, 0], 100) == [[0, 1], [2], [3], [4, 5]]
    assert plan_shards([], 100) == []


def test_produce_is_called_once_per_tensor_in_spec_order(tmp_path):
    calls = []

    def produce(name):
        calls.append(name)
        return np.full((3,), len(calls), np.float32)

    specs = [(n, "F32", (3,)) for n in ["z", "a", "m", "b"]]
    write_sharded(tmp_path, specs, produce, max_shard_bytes=24)
    assert calls == ["z", "a", "m", "b"]
    assert SafetensorsDir(tmp_path).read("m").tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float64), [[0.0] * 3] * 2], ids=["shape", "dtype", "list"]
)
def test_produce_mismatch_names_the_tensor_and_leaves_nothing(tmp_path, bad):
    specs = [("ok", "F32", (2, 3)), ("bad.weight", "F32", (2, 3))]
    with pytest.raises(ConversionError, match="bad.weight"):
        write_sharded(tmp_path, specs, lambda n: bad if n == "bad.weight" else np.zeros((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_unknown_dtype_in_specs(tmp_path):
    with pytest.raises(ConversionError, match="unsupported dtype 'F4' of tensor 'w'"):
        write_sharded(tmp_path, [("w", "F4", (2,))], lambda n: None)


def test_index_naming_a_missing_shard(tmp_path):
    _write(tmp_path, {f"w{i}": np.zeros(10, np.float32) for i in range(3)}, max_shard_bytes=40)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00003.safetensors.*missing"):
        SafetensorsDir(tmp_path)


def test_index_entry_absent_from_its_shard_and_foreign_entries_ignored(tmp_path):
    _write(tmp_path, {f"w{i}": np.zeros(10, np.float32) for i in range(3)}, max_shard_bytes=40)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["w0"] = "model-00002-of-00003.safetensors"
    del index["weight_map"]["w1"]  # w1 stays in shard 2's header, mapped nowhere: ignored
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="'w0'.*model-00002-of-00003.safetensors"):
        SafetensorsDir(tmp_path)
    index["weight_map"]["w0"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    assert SafetensorsDir(tmp_path).names() == ["w0", "w2"]


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_malformed_index(tmp_path, text):
    (tmp_path / INDEX_NAME).write_text(text)
    with pytest.raises(ConversionError, match=INDEX_NAME):
        SafetensorsDir(tmp_path)


def test_truncated_file_names_file_tensor_and_sizes(tmp_path):
    path = write_file(tmp_path / "x.safetensors", {"a": np.ones(8, np.float32), "last": np.ones(8, np.float32)})
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ConversionError, match="truncated") as e:
        SafetensorsDir(path)
    assert all(s in str(e.value) for s in ["x.safetensors", "'last'", f"expected file size {size}", f"{size - 10}"])


@pytest.mark.parametrize(
    "raw",
    [b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 8) + b"garbage!", struct.pack("<Q", 2) + b"[]"],
    ids=["short", "absurd-length", "not-json", "not-object"],
)
def test_header_garbage_names_the_file(tmp_path, raw):
    (tmp_path / "bad.safetensors").write_bytes(raw)
    with pytest.raises(ConversionError, match="bad.safetensors"):
        SafetensorsDir(tmp_path)


def test_unsupported_dtype_names_dtype_tensor_and_file(tmp_path):
    _raw_file(tmp_path / "f4.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(ConversionError, match=r"unsupported dtype 'F4' of tensor 'w' in file .*f4\.safetensors"):
        SafetensorsDir(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [{"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, {"dtype": "F32", "shape": [2]}, {"dtype": "F32"}],
)
def test_inconsistent_header_entry_names_tensor_and_file(tmp_path, entry):
    _raw_file(tmp_path / "h.safetensors", {"__metadata__": {}, "w": entry}, bytes(8))
    with pytest.raises(ConversionError, match=r"'w'.*h\.safetensors"):
        SafetensorsDir(tmp_path)


def test_unknown_tensor_name(tmp_path):
    write_file(tmp_path / "model.safetensors", {"a": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match=f"'nope' not found in {tmp_path}"):
        SafetensorsDir(tmp_path).read("nope")


def test_glob_mode_reads_all_files_and_rejects_duplicates(tmp_path):
    write_file(tmp_path / "b.safetensors", {"x": np.zeros(2, np.float32)})
    write_file(tmp_path / "a.safetensors", {"y": np.zeros(2, np.float32)})
    assert SafetensorsDir(tmp_path).files() == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    write_file(tmp_path / "c.safetensors", {"x": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match=r"'x'.*b\.safetensors.*c\.safetensors"):
        SafetensorsDir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds no model.safetensors.index.json"):
        SafetensorsDir(tmp_path / "empty")
    with pytest.raises(ConversionError, match="neither"):
        SafetensorsDir(tmp_path / "absent")


def test_read_is_a_read_only_view_of_the_mapped_file(tmp_path):
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_file(tmp_path / "v.safetensors", {"pad": np.zeros(3, np.uint8), "w": want})
    sd = SafetensorsDir(path)
    got = sd.read("w")
    assert got.base is not None and not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(sd._map(path), np.uint8))
    with pytest.raises(ValueError):
        got[0, 0] = 1
    with open(path, "r+b") as f:  # the array is the file's page cache, not a copy of it
        f.seek(sd.info("w").offset)
        f.write(np.float32(42).tobytes())
    assert got[0, 0] == 42


def test_read_rows(tmp_path):
    want = np.arange(60, dtype=np.int64).reshape(10, 3, 2) * 2**40
    sd = SafetensorsDir(write_file(tmp_path / "r.safetensors", {"w": want, "s": np.array(1.5, np.float32)}))
    np.testing.assert_array_equal(sd.read_rows("w", 3, 7), want[3:7])
    assert sd.read_rows("w", 5, 5).shape == (0, 3, 2) and np.shares_memory(sd.read_rows("w", 0, 1), sd.read("w"))
    with pytest.raises(ConversionError, match="'s'.*0-d"):
        sd.read_rows("s", 0, 1)
    with pytest.raises(ConversionError, match=r"rows \[8, 11\).*'w'"):
        sd.read_rows("w", 8, 11)




def test_release_drops_pages_but_views_stay_valid(tmp_path):
    a = np.arange(300_000, dtype=np.float32).reshape(300, 1000)
    write_file(tmp_path / "model.safetensors", {"a": a, "b": a[:3]})
    with SafetensorsDir(tmp_path) as sd:
        view = sd.read("a")
        assert view.sum() == a.sum()  # pages touched
        sd.release("a")
        np.testing.assert_array_equal(view, a)  # re-read from the file on access
