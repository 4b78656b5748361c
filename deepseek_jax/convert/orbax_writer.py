"""Writes a parameter tree into an Orbax PyTree checkpoint one slice at a time, never a whole array.

A converted DeepSeek checkpoint holds arrays such as `w_up[L=58, E=256, D=7168, F=2048]`, bigger than
host memory. Each leaf here is a `LazyArray`: its shape, dtype and a callable listing its pieces, each
a leading-axis index (a layer, or a (layer, expert) pair) and a callback producing that slice. A leaf
whose slices are themselves too big (V4.1's Engram tables: 393 GB as float32 in one slice) is written
in blocks of `rows` rows of the axis after the indexed ones instead. The writer opens the leaf's
TensorStore with a chunk grid that divides one slice (or one row block), so each write covers whole
chunks (no chunk is read, modified and rewritten in memory), and keeps at most `in_flight` pieces
being written while the next one is produced: peak host memory is a constant plus a few pieces,
whatever the tree's size.

The result is an ordinary Orbax PyTree checkpoint (OCDBT; zarr v2 like `StandardCheckpointHandler`,
or zarr3) whose leaves are typed `np.ndarray`: stock `ocp.StandardCheckpointer().restore(path,
abstract)` or `ocp.args.StandardRestore` / `PyTreeRestore` restore it into jax.Arrays under any
sharding, cast to another dtype if asked (`restore_tree` below).

Orbax internals this relies on (what an Orbax upgrade could break; tests/convert/test_orbax_writer.py
checks all of them): `type_handlers.NumpyHandler` (subclassed: its typestr, metadata and deserialize
are reused; `serialize` is replaced and writes before returning, so it returns no commit futures),
`_src.serialization.tensorstore_utils.build_array_write_spec` (the TensorStore spec Orbax itself
writes, given a `local_shape` = one slice as the write shape that chunks divide), `_src.serialization.
ocdbt_utils.get_process_index_for_subdir` (the per-process OCDBT subdirectory later merged by
`finalize`), and `ParamInfo.await_path_creation / name / parent_dir / ts_context / is_ocdbt_checkpoint`.

Single process only: the converter runs in one process, which writes everything; `write_tree` refuses
to run under `jax.process_count() > 1` (Orbax's save is collective, so other processes could not just
skip the call).
"""

import asyncio
import dataclasses
import itertools
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from deepseek_jax.convert.errors import ConversionError

Index = tuple[int, ...]
Piece = tuple[Index, Callable[[], np.ndarray]]


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """An array written piece by piece: `pieces()` yields `(index, produce)` pairs whose indices (all of
    one length k, integers on the leading k axes) cover `shape[:k]` exactly once; `produce()` returns the
    slice `array[index]`, of shape `shape[k:]` and dtype `dtype`, and is called once, when it is written.

    With `rows`, the last entry of an index numbers a block of `rows` rows of axis k - 1 instead:
    `(*lead, b)` stands for `array[(*lead, slice(b·rows, (b+1)·rows))]` (the last block may be shorter),
    and the indices cover `(*shape[:k-1], ⌈shape[k-1] / rows⌉)` exactly once."""

    shape: tuple[int, ...]
    dtype: Any  # anything np.dtype accepts, bfloat16 included (ml_dtypes)
    pieces: Callable[[], Iterable[Piece]]
    rows: int | None = None  # rows per block of axis k - 1 (see above); None: whole slices

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"LazyArray.rows must be >= 1, got {self.rows}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:  # Orbax's save logging reads it
        return self.size * self.dtype.itemsize

    @classmethod
    def of(cls, array: np.ndarray) -> "LazyArray":
        """An array already in memory, written as one piece."""
        array = np.asarray(array)
        return cls(array.shape, array.dtype, lambda: [((), lambda: array)])


class _LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    """Saves LazyArrays slice by slice; stored and restored as ordinary `np.ndarray` leaves."""

    def __init__(self, in_flight: int, chunk_bytes: int | None):
        super().__init__(deepcopy_host_arrays=False)
        self._in_flight, self._chunk_bytes = in_flight, chunk_bytes

    async def serialize(self, values, infos, args=None):
        for value, info in zip(values, infos, strict=True):
            await info.await_path_creation()
            await _write_array(value, info, self._in_flight, self._chunk_bytes)
        return []  # everything is on disk already: no commit futures to wait for


async def _write_array(value: LazyArray, info, in_flight: int, chunk_bytes: int | None) -> None:
    """Produces the pieces in order; up to `in_flight` writes run while the next piece is produced."""
    pieces = iter(value.pieces())
    first = next(pieces, None)
    if value.size == 0 or first is None:
        raise ConversionError(
            f"{info.name}: nothing to write for the array {value.shape} {value.dtype}"
            " (Orbax stores no zero-size arrays; a non-empty one needs pieces)"
        )
    k = len(first[0])
    grid = _grid(info.name, value, k)
    store = await _open_store(value, info, k, chunk_bytes)

    async def write(where: tuple, piece: np.ndarray) -> None:
        # TensorStore may reference `piece` instead of copying it; it is ours until the write commits.
        await store[where].write(piece, can_reference_source_data_indefinitely=True)

    seen: set[Index] = set()
    pending: set[asyncio.Task] = set()
    try:
        for index, produce in itertools.chain([first], pieces):
            index = _checked_index(info.name, index, grid, seen)
            where, shape = _block(value, index)
            piece = await asyncio.to_thread(produce)  # the event loop keeps writing meanwhile
            piece = _checked_piece(f"{info.name}{list(index)}", piece, shape, value.dtype)
            while len(pending) >= in_flight:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failed write stops the array here
            pending.add(asyncio.create_task(write(where, piece)))
            del piece
        await asyncio.gather(*pending)
    finally:  # on an error too, started writes end before the caller removes the directory
        await asyncio.gather(*pending, return_exceptions=True)
    if len(seen) != math.prod(grid):
        missing = next(i for i in np.ndindex(*grid) if i not in seen)
        raise ConversionError(
            f"{info.name}: {math.prod(grid) - len(seen)} {'row blocks' if value.rows else 'slices'} of "
            f"{value.shape} were never produced, e.g. {list(missing)}"
        )


def _grid(name: str, value: LazyArray, k: int) -> tuple[int, ...]:
    """The bounds of the piece indices: `shape[:k]`, the last one counting row blocks if `rows` is set."""
    if k > len(value.shape) or (value.rows is not None and k == 0):
        what = "row blocks need at least one" if k == 0 else f"the array {value.shape} has fewer"
        raise ConversionError(f"{name}: piece indices have {k} axes; {what}")
    if value.rows is None:
        return value.shape[:k]
    return (*value.shape[: k - 1], -(-value.shape[k - 1] // value.rows))


def _block(value: LazyArray, index: Index) -> tuple[tuple, tuple[int, ...]]:
    """Where piece `index` goes (a TensorStore index) and the shape `produce()` must return."""
    k = len(index)
    if value.rows is None:
        return index, value.shape[k:]
    *lead, b = index
    r0 = b * value.rows
    r1 = min(r0 + value.rows, value.shape[k - 1])
    return (*lead, slice(r0, r1)), (r1 - r0, *value.shape[k:])


async def _open_store(value: LazyArray, info, k: int, chunk_bytes: int | None) -> ts.TensorStore:
    """Creates the array with Orbax's own write spec, its chunks dividing one slice `(1,)*k + shape[k:]`
    (or one row block `(1,)*(k-1) + (rows,) + shape[k:]`): every write then covers whole chunks (the
    last row block ends at the array's edge, where a chunk may overhang), so no chunk is read back,
    modified and rewritten. `chunk_bytes` only splits a big piece further (a sharded restore then
    reads fewer unneeded bytes)."""
    local = (1,) * k + value.shape[k:]
    if value.rows is not None:  # _grid has checked 1 <= k <= ndim
        local = (1,) * (k - 1) + (min(value.rows, value.shape[k - 1]),) + value.shape[k:]
    spec = ts_utils.build_array_write_spec(
        info,
        ocp.SaveArgs(chunk_byte_size=chunk_bytes),
        global_shape=value.shape,
        local_shape=local,
        dtype=value.dtype,
        use_ocdbt=info.is_ocdbt_checkpoint,
        process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
    )
    return await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)


def _checked_piece(name: str, piece, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    piece = np.asarray(piece)
    if piece.shape != shape or piece.dtype != dtype:  # never cast silently
        raise ConversionError(
            f"{name}: produced {piece.shape} {piece.dtype}, expected {shape} {dtype}"
        )
    return piece


def _checked_index(name: str, index, bounds: tuple[int, ...], seen: set[Index]) -> Index:
    index = tuple(int(i) for i in index)
    if len(index) != len(bounds) or not all(0 <= i < b for i, b in zip(index, bounds, strict=True)):
        raise ConversionError(
            f"{name}: piece index {list(index)} is not an index of the leading axes {list(bounds)}"
        )
    if index in seen:
        raise ConversionError(f"{name}: piece {list(index)} produced twice")
    seen.add(index)
    return index


def write_tree(
    directory: str | Path,
    tree: Any,
    *,
    use_zarr3: bool = False,
    in_flight: int = 2,
    chunk_bytes: int | None = 64 * 2**20,
    compress: bool = True,
) -> None:
    """Writes `tree` (nested dicts of LazyArray | np.ndarray) as an Orbax PyTree checkpoint at `directory`.

    `directory` must not exist. The checkpoint is built in a hidden sibling directory
    `.<name>.partial-*` and renamed into place only when complete: if a produce() callback raises,
    that directory is removed, nothing appears at `directory`, and the exception propagates unchanged
    (a killed process leaves only the hidden directory). Leaves are written one after another.

    Args:
      use_zarr3: zarr v3 instead of v2 (the format `StandardCheckpointHandler` writes); restore reads
        either.
      in_flight: piece writes running at once; host memory peaks near (3 in_flight + 1) pieces (a
        piece, its encoded copy and zstd's buffer per write, plus the piece being produced): slices,
        or row blocks for a LazyArray with `rows`.
      chunk_bytes: largest stored chunk; a slice bigger than this is split into several chunks.
      compress: zstd, as Orbax does by default (about 1.5x slower on 2 cores, ~10% smaller on f32)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists")
    if jax.process_count() > 1:
        raise ConversionError(
            "write_tree runs in one process only (it writes the whole checkpoint); "
            f"this is one of {jax.process_count()}"
        )
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    lazy = jax.tree.map(_as_lazy, tree)
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True,
        use_zarr3=use_zarr3,
        use_compression=compress,
        type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            (LazyArray, _LazyArrayHandler(in_flight, chunk_bytes))
        ),
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(staging / "tree", args=ocp.args.PyTreeSave(lazy))
        (staging / "tree").rename(directory)  # same file system: atomic
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _as_lazy(leaf) -> LazyArray:
    if isinstance(leaf, LazyArray):
        return leaf
    if isinstance(leaf, (np.ndarray, np.generic)):
        return LazyArray.of(leaf)
    raise ConversionError(
        f"write_tree takes LazyArray or np.ndarray leaves, not {type(leaf).__name__}"
    )


def restore_tree(directory: str | Path, abstract_tree: Any) -> Any:
    """jax.Arrays placed as the `jax.ShapeDtypeStruct` leaves' shardings say (device 0 where a leaf has
    none), cast to their dtypes where the stored dtype differs."""
    device0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_tree = jax.tree.map(
        lambda s: (
            s
            if s.sharding is not None
            else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device0)
        ),
        abstract_tree,
    )
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        return checkpointer.restore(
            Path(directory).absolute(), args=ocp.args.StandardRestore(abstract_tree)
        )


def stored_shapes(directory: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a/b/c": (shape, dtype name)} for every array of the checkpoint, read from metadata only."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(Path(directory).absolute()).tree
    leaves = jax.tree_util.tree_flatten_with_path(metadata)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): (
            tuple(leaf.shape),
            np.dtype(leaf.dtype).name,
        )
        for path, leaf in leaves
    }
