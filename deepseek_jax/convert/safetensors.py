"""Our own safetensors container reader and streaming writer (every DeepSeek dtype, F8 included).

Stock `safetensors.numpy` cannot return F8_E4M3 / F8_E8M0 arrays (numpy has no float8 attribute), so we
parse the container ourselves (`/work/shared/reference/checkpoint_formats.md` §1, §7;
https://github.com/huggingface/safetensors#format):

    file  = u64 little-endian N | N bytes of UTF-8 JSON header (space-padded) | byte buffer
    header: {name: {"dtype": "F8_E4M3", "shape": [..], "data_offsets": [begin, end)}, "__metadata__": {..}}
    index = model.safetensors.index.json: {"metadata": {"total_size": ..}, "weight_map": {name: shard}}
Reading parses headers only, validates them eagerly; a tensor is a read-only zero-copy view of a
file-backed `mmap` of its shard (one per shard, opened lazily); `release` drops consumed pages. Writing
streams one tensor at a time: the caller lists every tensor first (name, dtype, shape) so each shard's
header precedes its data, then `produce(name)` is called once per tensor, in order. Files appear under
their final names only when complete, the index last.
"""

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import ml_dtypes
import numpy as np

from deepseek_jax.convert.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_CHUNK = 64 * 2**20  # bytes per write call: bounds the temporary memoryview slices, not the array

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

Spec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype string, shape)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `offset` is absolute in `file` (8 + N + data_offsets[0])."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, a key of DTYPES
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _np_dtype(dtype: str, name: str, file: Path | str) -> np.dtype:
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r} of tensor {name!r} in file {file}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------- reading


def _counts(xs: object) -> bool:
    """A JSON list of non-negative ints (bools excluded)."""
    return isinstance(xs, list | tuple) and all(type(x) is int and x >= 0 for x in xs)


def _tensor_info(name: str, entry: object, file: Path, data_start: int) -> TensorInfo:
    """Validates one header entry and turns its buffer-relative offsets into absolute ones."""
    bad = f"malformed header entry for tensor {name!r} in file {file}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ConversionError(f"{bad}: {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    itemsize = _np_dtype(dtype, name, file).itemsize if isinstance(dtype, str) else None
    if itemsize is None or not _counts(shape) or not _counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ConversionError(f"{bad}: {entry!r}")
    want = itemsize * prod(shape)
    if offsets[1] - offsets[0] != want:
        raise ConversionError(
            f"tensor {name!r} in file {file}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
            f"but {dtype} {shape} needs {want}"
        )
    return TensorInfo(name, file, dtype, tuple(shape), data_start + offsets[0], want)


def _check_not_truncated(file: Path, size: int, infos: Mapping[str, TensorInfo]) -> None:
    expected = max((i.offset + i.nbytes for i in infos.values()), default=0)
    if expected > size:
        first = min((i for i in infos.values() if i.offset + i.nbytes > size), key=lambda i: i.offset)
        raise ConversionError(
            f"file {file} is truncated: tensor {first.name!r} needs bytes [{first.offset}, "
            f"{first.offset + first.nbytes}); expected file size {expected}, actual {size}"
        )


def read_header(file: Path | str) -> tuple[dict[str, TensorInfo], dict]:
    """Parses one file's header only -> ({name: TensorInfo}, `__metadata__`); checks all bytes exist."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise ConversionError(f"file {file}: header length {n} is impossible for a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"file {file}: header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ConversionError(f"file {file}: header is not a JSON object of tensors")
    meta = header.pop("__metadata__", {})
    infos = {name: _tensor_info(name, entry, file, 8 + n) for name, entry in header.items()}
    _check_not_truncated(file, size, infos)
    return infos, meta


def _read_index(index: Path) -> tuple[dict, dict[Path, list[str]]]:
    """Index JSON -> (its "metadata", {shard path: names the index assigns to it}); shards must exist."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"index {index} is not valid JSON ({e})") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"index {index} has no weight_map of tensor name -> shard file")
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(index.parent / shard, []).append(name)
    for shard, names in shards.items():
        if not shard.is_file():
            raise ConversionError(f"shard {shard} named by index {index} (e.g. for tensor {names[0]!r}) is missing")
    return doc.get("metadata") or {}, dict(sorted(shards.items()))


def _find_shards(path: Path) -> tuple[dict | None, dict[Path, list[str] | None]]:
    """Resolves `path` -> (index metadata or None, {shard: wanted names, or None for all of them})."""
    if path.is_file():
        return None, {path: None}
    if not path.is_dir():
        raise ConversionError(f"{path} is neither a safetensors file nor a directory")
    if (path / INDEX_NAME).is_file():
        return _read_index(path / INDEX_NAME)
    if (path / SINGLE_NAME).is_file():
        return None, {path / SINGLE_NAME: None}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"directory {path} holds no {INDEX_NAME} and no *.safetensors files")
    return None, dict.fromkeys(files)


class SafetensorsDir:
    """A checkpoint directory (index + shards, one `model.safetensors`, or all `*.safetensors`) or one file.

    Construction reads and validates every header (cheap); `read` maps bytes lazily, never copies.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._index_meta, wanted = _find_shards(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self._file_meta: dict = {}
        self._maps: dict[Path, mmap.mmap] = {}  # shard -> its read-only mapping, opened on first read
        for file, names in wanted.items():
            infos, meta = read_header(file)
            self._file_meta.update(meta)
            self._add(file, infos, names)

    def _add(self, file: Path, infos: dict[str, TensorInfo], names: list[str] | None) -> None:
        if names is not None:  # indexed: take exactly the names mapped here; other header entries are ignored
            missing = [n for n in names if n not in infos]
            if missing:
                raise ConversionError(f"tensor {missing[0]!r} is mapped to shard {file} by the index, "
                                      f"but that shard's header lacks it ({len(missing)} missing)")
            infos = {n: infos[n] for n in names}
        for name, info in infos.items():
            if name in self._infos:
                raise ConversionError(f"tensor {name!r} is in both {self._infos[name].file} and {file}")
            self._infos[name] = info

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise ConversionError(f"tensor {name!r} not found in {self.path}")
        return self._infos[name]

    def metadata(self) -> dict:
        """The index's "metadata" (`total_size`, ...); without an index, the files' `__metadata__` merged."""
        return dict(self._file_meta if self._index_meta is None else self._index_meta)

    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:  # the mapping keeps its own reference to the file
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a read-only view of the mapped file (dtype from DTYPES, C order)."""
        info = self.info(name)
        dt = DTYPES[info.dtype]  # frombuffer of an ACCESS_READ mmap: read-only, no copy, alignment not needed
        return np.frombuffer(self._map(info.file), dt, info.nbytes // dt.itemsize, info.offset).reshape(info.shape)

    def read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the leading axis, a view: only those rows' pages are ever read from disk."""
        info = self.info(name)
        if not info.shape:
            raise ConversionError(f"tensor {name!r} in file {info.file} is 0-d; it has no rows to slice")
        if not 0 <= r0 <= r1 <= info.shape[0]:
            raise ConversionError(f"rows [{r0}, {r1}) out of range for tensor {name!r} of shape {info.shape} "
                                  f"in file {info.file}")
        return self.read(name)[r0:r1]

    def prefetch(self, names: Iterable[str]) -> None:
        """Asks the kernel to start reading these tensors' pages (madvise WILLNEED, asynchronous), so
        that work on the current tensor overlaps the disk reads of the next. A no-op where unsupported."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for name in names:
            info = self.info(name)
            start = info.offset - info.offset % mmap.PAGESIZE
            if info.nbytes:
                self._map(info.file).madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)

    def release(self, name: str, byte_range: tuple[int, int] | None = None) -> None:
        """Drops this tensor's pages (or those of its bytes [b0, b1), rounded out to pages) from the process
        (madvise DONTNEED; a live view re-reads them from the file): else every page read stays in RSS."""
        info = self.info(name)
        b0, b1 = byte_range or (0, info.nbytes)
        if b1 > b0 and hasattr(mmap, "MADV_DONTNEED"):
            start = info.offset + b0 - (info.offset + b0) % mmap.PAGESIZE
            self._map(info.file).madvise(mmap.MADV_DONTNEED, start, info.offset + b1 - start)

    def close(self) -> None:
        """Drops the mappings; arrays already returned keep their own shard mapped until they are freed."""
        self._maps.clear()

    def __enter__(self) -> "SafetensorsDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- writing


def _checked_specs(specs: Iterable[Spec], where: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Specs with their byte sizes; names unique, dtypes known, shapes of non-negative ints."""
    out, seen = [], set()
    for name, dtype, shape in specs:
        itemsize = _np_dtype(dtype, name, where).itemsize
        shape = tuple(shape)
        if name in seen or name == "__metadata__" or not _counts(shape):
            raise ConversionError(f"tensor {name!r}: duplicate/reserved name or bad shape {shape} in specs")
        seen.add(name)
        out.append((name, dtype, shape, itemsize * prod(shape)))
    return out


def plan_shards(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Greedy in-order grouping of tensor indices: a new shard starts when the next tensor would push
    the current one over `max_shard_bytes`; a tensor bigger than that gets a shard of its own."""
    shards: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not shards or used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...], int]], file_meta: dict) -> bytes:
    """Header JSON with tensors laid out back to back in entry order, space-padded to a multiple of 8."""
    header: dict = {"__metadata__": file_meta}
    begin = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _write_array(f, arr: object, name: str, dtype: str, shape: tuple[int, ...], path: Path) -> None:
    """Checks `arr` against its spec, then writes its C-order bytes in chunks (no whole-shard buffer)."""
    if not isinstance(arr, np.ndarray) or arr.dtype != DTYPES[dtype] or arr.shape != shape:
        got = (arr.dtype, arr.shape) if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ConversionError(f"tensor {name!r} for {path}: produced {got}, spec says {DTYPES[dtype]} {shape}")
    flat = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # copies only if not C-contiguous
    for i in range(0, len(flat), _CHUNK):
        f.write(flat[i : i + _CHUNK])


def _write_shard(path: Path, entries, produce: Callable[[str], np.ndarray], file_meta: dict) -> None:
    """Writes `<path>.tmp` (header, then each produced tensor), then renames it to `path`."""
    header = _header_bytes(entries, file_meta)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for name, dtype, shape, _ in entries:
                _write_array(f, produce(name), name, dtype, shape, path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _string_metadata(metadata: Mapping | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConversionError(f"metadata must map str -> str (safetensors __metadata__), got {metadata!r}")
    return metadata


def write_sharded(
    out_dir: Path | str,
    specs: Iterable[Spec],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    index_name: str = INDEX_NAME,
) -> list[Path]:
    """Streams tensors into `model-0000k-of-0000n.safetensors` shards + index (or one `model.safetensors`).

    `produce(name)` is called exactly once per spec, in spec order, so one tensor is in memory at a
    time. `metadata` goes into the index's "metadata" (after `total_size`), or into the single file's
    `__metadata__`. A stale index in `out_dir` is removed first; the new one is written last, so an
    interrupted run leaves no index. Returns the shard paths in order.
    """
    out_dir = Path(out_dir)
    entries, metadata = _checked_specs(specs, out_dir), _string_metadata(metadata)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / index_name).unlink(missing_ok=True)
    groups = plan_shards([e[3] for e in entries], max_shard_bytes)
    if len(groups) <= 1:
        path = out_dir / SINGLE_NAME
        _write_shard(path, entries, produce, {"format": "pt", **metadata})
        return [path]
    paths = [out_dir / f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for path, group in zip(paths, groups):
        _write_shard(path, [entries[i] for i in group], produce, {"format": "pt"})
    weight_map = {entries[i][0]: p.name for p, group in zip(paths, groups) for i in group}
    index_meta = {"total_size": sum(e[3] for e in entries), **metadata}
    _write_json(out_dir / index_name, {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))})
    return paths


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors dtype string of a numpy dtype (inverse of DTYPES)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ConversionError(f"numpy dtype {dtype} has no safetensors dtype string")


def write_file(path: Path | str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Writes small in-memory arrays to one file (any size), in dict order; `metadata` -> `__metadata__`."""
    path = Path(path)
    specs = [(name, dtype_name(a.dtype), a.shape) for name, a in tensors.items()]
    _write_shard(path, _checked_specs(specs, path), tensors.__getitem__, {"format": "pt", **_string_metadata(metadata)})
    return path
