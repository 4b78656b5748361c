"""V4.1's Engram tables are imported by blocks of rows (convert/importer.py `_block_rows`, orbax_writer.py
`LazyArray.rows`), never in one piece: a released table is 384M rows, 393 GB as float32.

- A tiny V4.1 (configs/model/tiny_v41.yaml, vocab 256) stored as released (FP8 tables with 1×32 E8M0 row
  scales) and imported with 1000-row blocks: its tables (8214 and 8612 rows, padded to 9216) take ten
  blocks, the ninth crossing into the zero padding and the last partial; the Orbax arrays equal the
  one-piece path's bit for bit, in float32 and bfloat16, and the whole import equals the in-memory
  conversion of the dequantised tensors.
- Memory (slow): a 2,000,000 × 256 FP8 table (512 MB on disk, 2 GB as float32) imported with 64 MiB
  blocks; the import's peak RSS (VmHWM, mapped file pages included) stays a few blocks above what
  the process held before it.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from deepseek_jax.config import load_model_config
from deepseek_jax.convert import table, v41
from deepseek_jax.convert.formats import dequant
from deepseek_jax.convert.importer import ROW_BLOCK_BYTES, abstract_variables, import_checkpoint, lazy_tree
from deepseek_jax.convert.orbax_writer import restore_tree, stored_shapes, write_tree
from deepseek_jax.convert.safetensors import SafetensorsDir, dtype_name, write_sharded
from deepseek_jax.convert.source import open_source
from deepseek_jax.layers.engram import table_rows
from tests.utils import CONFIGS, ROOT

QUANT = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
         "scale_fmt": "ue8m0", "expert_dtype": "fp4"}  # the release's quantization_config
ROWS = 1000  # rows per block in the tiny test


def _tiny(**engram):
    cfg = load_model_config([CONFIGS / "model" / "tiny_v41.yaml"])
    return dataclasses.replace(cfg, vocab_size=256, engram=dataclasses.replace(cfg.engram, **engram))


def _released(cfg, variables) -> dict[str, np.ndarray]:
    """Every official tensor as the release stores it (FP8 / FP4 / E8M0 / BF16 / F32)."""
    official = table.from_variables(variables, v41.FAMILY, cfg, "official")
    return {k: a for n, w in official.items() for k, a in v41.quantize_as_released(n, w).items()}


def _write(directory: Path, cfg, stored: dict) -> Path:
    directory.mkdir(parents=True)
    specs = [(n, dtype_name(a.dtype), a.shape) for n, a in stored.items()]
    write_sharded(directory, specs, stored.__getitem__, max_shard_bytes=4_000_000)
    (directory / "config.json").write_text(json.dumps({**v41.config_to_json(cfg), "quantization_config": QUANT}))
    return directory


def _tables(tree: dict) -> dict:
    """{layers_i: {block_0: {engram: {table}}}}: the Engram table leaves of a {"params", "router"} tree."""
    leaves = [(p, v) for p, v in table.iter_leaves(tree) if p[-2:] == ("engram", "table")]
    assert [p[1:3] for p, _ in leaves] == [("layers_1", "block_0"), ("layers_4", "block_0")], leaves
    return {p[1]: {"block_0": {"engram": {"table": v}}} for p, v in leaves}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = _tiny()
    abstract = abstract_variables(cfg)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    stored = _released(cfg, variables)
    return cfg, abstract, stored, _write(tmp_path_factory.mktemp("large_tables") / "src", cfg, stored)


def test_block_plan_of_the_tiny_tables(tiny):
    cfg, abstract, _, src_dir = tiny
    src = open_source(src_dir)
    tables = _tables(lazy_tree(src, abstract, np.float32, row_block_bytes=ROWS * cfg.engram.head_dim * 4))
    whole = _tables(lazy_tree(src, abstract, np.float32))  # default budget: tiny slices stay one piece
    for j, (key, node) in enumerate(sorted(tables.items())):
        lazy, n = node["block_0"]["engram"]["table"], cfg.engram.num_embeddings[j]
        P = table_rows(n)
        assert lazy.shape == (1, P, cfg.engram.head_dim) and lazy.rows == ROWS and P == 9216
        assert [idx for idx, _ in lazy.pieces()] == [(0, b) for b in range(10)]
        assert n // ROWS == 8 and P - 9 * ROWS == 216  # block 8 holds the last rows and zeros; block 9: zeros
        assert whole[key]["block_0"]["engram"]["table"].rows is None
    assert ROW_BLOCK_BYTES == 256 * 2**20


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_row_blocks_write_what_one_piece_writes(tiny, tmp_path, dtype):
    cfg, abstract, _, src_dir = tiny
    src = open_source(src_dir)
    blocks = _tables(lazy_tree(src, abstract, np.dtype(dtype), row_block_bytes=ROWS * cfg.engram.head_dim * 4))
    whole = _tables(lazy_tree(src, abstract, np.dtype(dtype)))
    write_tree(tmp_path / "blocks", blocks)
    write_tree(tmp_path / "whole", whole)
    assert stored_shapes(tmp_path / "blocks") == stored_shapes(tmp_path / "whole")
    assert {d for _, d in stored_shapes(tmp_path / "blocks").values()} == {np.dtype(dtype).name}
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), _tables(abstract))
    got, want = restore_tree(tmp_path / "blocks", target), restore_tree(tmp_path / "whole", target)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        bits = np.uint32 if dtype == np.float32 else np.uint16
        np.testing.assert_array_equal(np.asarray(g).view(bits), np.asarray(w).view(bits))
    tbl = np.asarray(got["layers_1"]["block_0"]["engram"]["table"])[0]
    n = cfg.engram.num_embeddings[0]
    assert np.abs(tbl[:n]).max() > 0 and not tbl[n:].any()  # padding rows zero


def test_import_by_row_blocks_equals_the_dequantised_tensors(tiny, tmp_path):
    """The whole import (`import_checkpoint`, 1000-row blocks) against `table.to_variables` of every
    tensor dequantised in one piece: the in-memory conversion the one-piece import is tested against."""
    cfg, abstract, stored, src_dir = tiny
    out = import_checkpoint(src_dir, tmp_path / "ours", row_block_bytes=ROWS * cfg.engram.head_dim * 4,
                            log=lambda _: None)
    want = {}
    for n in (e.name("official") for e in table.entries(v41.FAMILY, cfg)):
        kind, scale = v41.stored_as(n), n.removesuffix(".weight") + ".scale"
        want[n] = (dequant(n, stored[n], stored[scale], config_block=(32, 32), fp4=kind == "fp4")
                   if kind in ("fp4", "fp8", "table") else stored[n].astype(np.float32))
    for layer in cfg.engram.layer_ids:  # stored in chunks of one block (one slice, 9216 rows, without blocks)
        assert _open(out / "params", f"params.layers_{layer}.block_0.engram.table").chunk_layout.write_chunk.shape == (
            1, ROWS, cfg.engram.head_dim)
    got = restore_tree(out / "params", abstract)
    expected = table.to_variables(want, v41.FAMILY, cfg, "official")
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, expected)


def _open(directory: Path, path: str) -> ts.TensorStore:
    """One array of an Orbax checkpoint (OCDBT, zarr v2) as a TensorStore: read alone, chunks visible."""
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/", "path": path}}
    return ts.open(spec, open=True, read=True).result()


# ----------------------------------------------------------------------------------------------
# memory

BIG_ROWS, WIDTH = 2_000_000, 256  # 512 MB of FP8 on disk, 2 GB as float32
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from deepseek_jax.convert.importer import abstract_variables, import_checkpoint
    from deepseek_jax.convert.source import open_source

    def hwm_mb():  # this process's own peak RSS (ru_maxrss would carry the forking parent's over exec)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    src, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    abstract_variables(open_source(src).cfg)  # the model's shapes, traced again by the import: not the table's
    base = hwm_mb()
    start = time.perf_counter()
    import_checkpoint(src, out, row_block_bytes=budget, log=lambda _: None)
    print(json.dumps({"base_mb": base, "peak_mb": hwm_mb(), "seconds": time.perf_counter() - start}))
""")


def _big_table(directory: Path, rows: int, width: int) -> tuple[np.memmap, np.ndarray]:
    """Random FP8 codes (NaN codes 0x7F / 0xFF avoided) in a memory-mapped file, written 64 MB at a
    time, and E8M0 row scales 2^-7 … 2^6: the source checkpoint is written without holding the table."""
    rng = np.random.default_rng(1)
    codes = np.memmap(directory / "codes.bin", np.uint8, "w+", shape=(rows, width))
    step = 2**26 // width
    for r0 in range(0, rows, step):
        codes[r0 : r0 + step] = rng.integers(0, 256, (min(step, rows - r0), width), np.uint8) & 0xFE
    codes.flush()
    scale = rng.integers(120, 134, (rows, width // 32), np.uint8).view(ml_dtypes.float8_e8m0fnu)
    return codes.view(ml_dtypes.float8_e4m3fn), scale


@pytest.mark.slow
def test_peak_memory_of_a_2m_row_table_is_a_few_blocks(tmp_path):
    cfg = _tiny(num_embeddings=(BIG_ROWS, 8612), head_dim=WIDTH)
    abstract = abstract_variables(cfg)
    rng = np.random.default_rng(0)
    small = jax.tree.map(lambda s: rng.standard_normal(s.shape if s.size < 2**22 else (1, 1, WIDTH))
                         .astype(np.float32), abstract)  # the big table: replaced below
    stored = _released(cfg, small)
    (tmp_path / "gen").mkdir()
    stored["layers.1.engram.embed.weight"], stored["layers.1.engram.embed.scale"] = _big_table(
        tmp_path / "gen", BIG_ROWS, WIDTH)
    src_dir = _write(tmp_path / "src", cfg, stored)
    del stored
    (tmp_path / "gen" / "codes.bin").unlink()
    budget = 64 * 2**20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(src_dir), str(tmp_path / "ours"), str(budget)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    table_mb = table_rows(BIG_ROWS) * WIDTH * 4 / 2**20
    print(f"\n{BIG_ROWS:,} x {WIDTH} FP8 table ({table_mb:.0f} MiB as float32), {budget >> 20} MiB blocks: "
          f"peak RSS {result['peak_mb']:.0f} MB, {result['peak_mb'] - result['base_mb']:.0f} MB above the "
          f"{result['base_mb']:.0f} MB before the import; import {result['seconds']:.1f} s "
          f"(subprocess {time.perf_counter() - start:.1f} s)")
    # (3 in_flight + 1) blocks of 64 MiB in the writer, plus the block being produced (its FP8 rows,
    # float32 values, their copy): about 10 blocks, against the table's 1954 MiB of float32.
    assert result["peak_mb"] - result["base_mb"] < 12 * 64, result
    params = tmp_path / "ours" / "params"
    assert stored_shapes(params)["params/layers_1/block_0/engram/table"] == ((1, table_rows(BIG_ROWS), WIDTH),
                                                                            "float32")
    with SafetensorsDir(src_dir) as sd:  # the first rows, and the last ones with the padding after them
        for r0, r1 in ((0, 1000), (BIG_ROWS - 1000, table_rows(BIG_ROWS))):
            got = np.asarray(_open(params, "params.layers_1.block_0.engram.table")[0, r0:r1].read().result())
            m = min(r1, BIG_ROWS) - r0
            want = dequant("table", sd.read("layers.1.engram.embed.weight"), sd.read("layers.1.engram.embed.scale"),
                           rows=(r0, r0 + m))
            np.testing.assert_array_equal(got[:m], want)
            assert not got[m:].any()


