"""Streaming-import benchmark: peak RSS and throughput of `import_checkpoint` on synthetic FP8 V3 checkpoints.

For each size in --sizes (GB on disk, 1 GB = 1e9 bytes) this writes a synthetic DeepSeek-V3-shaped
FP8 checkpoint (config.json with quantization_config fp8 / e4m3 / [128, 128] blocks, an index and
many ~256 MiB shards; transformers' on-disk names, the "hf" layout of convert/v3.py), then imports
it with `import_checkpoint(src, out, dtype=--dtype)` in a fresh subprocess per run and measures
that subprocess only:

  - peak RSS: `ru_maxrss` from `os.wait4(pid)` (this child's own rusage, not RUSAGE_CHILDREN, which
    would be the max over all children so far); plus /proc/<pid>/status polled every 0.1 s for the
    largest RssAnon (heap: numpy arrays, JAX, TensorStore buffers) and RssFile (file-backed pages
    mapped into the process: the memory-mapped shards) seen;
  - import seconds: wall time of the `import_checkpoint` call inside the child (not Python / JAX
    start-up), CPU seconds (user + sys) of the whole child, MB/s = checkpoint bytes / import seconds.

Sizes share every tensor shape: only the number of MoE layers differs, so the per-tensor working set
is the same and the peaks are comparable. FP8 weights (the official names matching
`v3.FAMILY.fp8_names`) are random F8_E4M3 bytes (NaN codes 0x7F / 0xFF avoided) with F32
`weight_scale_inv` grids of 2^U(-12, -6); norms are BF16 ~1, the router, embedding and head BF16,
`e_score_correction_bias` F32. Generation streams one tensor at a time (`write_sharded`).

Page cache: right after generation the shards are in the page cache. Each run first puts the shards
in the state its --runs variant names, per file, without root: `cold` = fsync + posix_fadvise
DONTNEED (resident bytes checked with `fincore` where installed), `warm` = read every shard once.
Variants (each its own child, same checkpoint):
  cold           the importer as it is;
  cold+prefetch  the same with `SafetensorsDir.prefetch` (madvise WILLNEED) of the next --prefetch
                 tensors (weights and scales) in the order the importer reads them, wired in by
                 wrapping `Source.load` inside the child (deepseek_jax is not modified);
  cold+norelease the importer with `Source.release` made a no-op in the child: what it did before
                 it released each tensor's pages (madvise DONTNEED) once consumed, i.e. every page
                 of every shard it touched stayed mapped in, and counted in RSS, until the end;
  warm           the importer as it is, shards read into the page cache first.

Prints a Markdown table and writes experiments/results/bench_convert.md (a hand-written
"## Reading" section there is kept across reruns). Generated data is deleted unless --keep.

    python experiments/bench_convert.py [--sizes 2,8] [--dir /tmp/bench_convert] [--dtype bfloat16]
        [--runs cold,cold+prefetch,cold+norelease,warm] [--prefetch 4] [--shard-mib 256] [--vocab 32768] [--keep]
"""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "experiments" / "results" / "bench_convert.md"
VARIANTS = ("cold", "cold+prefetch", "cold+norelease", "warm")
GB, MB = 1e9, 1e6

# DeepSeek-V3 shaped, scaled down: MLA with a query LoRA, 1 dense layer then MoE layers of 32 routed
# experts (top 4 of 4 groups, 2 groups kept) + 1 shared. kv_a_proj's 576 rows give edge FP8 tiles.
# Per-tensor sizes do not depend on the number of layers.
DIMS = {
    "vocab_size": 32768, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 1536,
    "first_k_dense_replace": 1, "num_attention_heads": 16, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 32,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
}  # fmt: skip


def hf_config(n_layers: int) -> dict:
    """A valid deepseek_v3 config.json (as the released one, smaller) with `n_layers` layers, no MTP."""
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", **DIMS,
        num_hidden_layers=n_layers, num_key_value_heads=DIMS["num_attention_heads"], num_nextn_predict_layers=0,
        rms_norm_eps=1e-6, max_position_embeddings=163840, scoring_func="sigmoid", topk_method="noaux_tc",
        routed_scaling_factor=2.5, norm_topk_prob=True, moe_layer_freq=1, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]},
    )  # fmt: skip


# ------------------------------------------------------------------------------------- checkpoint


def checkpoint_specs(hf: dict) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(name, safetensors dtype, shape, kind) of every tensor, each FP8 weight followed by its scale;
    kind: fp8 | scale | norm | f32 | bf16. Shapes from the model's own variables (expected_shape)."""
    from deepseek_jax.convert import v3
    from deepseek_jax.convert.importer import abstract_variables, expected_shape
    from deepseek_jax.convert.table import entries

    fam = v3.FAMILY
    cfg = fam.config_from_json(hf)
    block = hf["quantization_config"]["weight_block_size"]
    abstract = abstract_variables(cfg)
    specs = []
    for ent in entries(fam, cfg):
        name, official = ent.name("hf"), ent.name("official")
        shape = expected_shape(ent, abstract, cfg)
        if re.search(fam.fp8_names, official):
            specs.append((name, "F8_E4M3", shape, "fp8"))
            grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
            specs.append(
                (name.removesuffix(".weight") + fam.scale_suffix["hf"], "F32", grid, "scale")
            )
        elif re.search(fam.f32_names, official):
            specs.append((name, "F32", shape, "f32"))
        else:
            specs.append((name, "BF16", shape, "norm" if len(shape) == 1 else "bf16"))
    return specs


def nbytes(spec) -> int:
    from deepseek_jax.convert.safetensors import DTYPES

    return DTYPES[spec[1]].itemsize * math.prod(spec[2])


def plan_layers(target_bytes: float) -> int:
    """Layers (1 dense + MoE) whose checkpoint is closest to `target_bytes`."""
    dense = DIMS["first_k_dense_replace"]
    b1, b2 = (sum(map(nbytes, checkpoint_specs(hf_config(dense + k)))) for k in (1, 2))
    per_layer, fixed = b2 - b1, b1 - (b2 - b1)
    return dense + max(1, round((target_bytes - fixed) / per_layer))


def tensor_values(spec, rng):
    """One tensor's values (only this one is ever in memory)."""
    import ml_dtypes
    import numpy as np

    name, _, shape, kind = spec
    n = math.prod(shape)
    if kind == "fp8":
        b = np.frombuffer(rng.bytes(n), np.uint8).copy()
        b[(b & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are e4m3 NaN: make them 0x7E / 0xFE (448)
        return b.view(ml_dtypes.float8_e4m3fn).reshape(shape)
    if kind == "scale":
        return np.exp2(rng.uniform(-12, -6, shape)).astype(np.float32)
    if kind == "f32":
        return (0.01 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if kind == "norm":
        return (1 + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    scale = 0.02 if "embed" in name or "lm_head" in name else shape[-1] ** -0.5
    return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)


def generate(directory: Path, hf: dict, shard_bytes: int, seed: int = 0) -> dict:
    """Writes config.json + index + shards, streaming one tensor at a time."""
    import numpy as np

    from deepseek_jax.convert.safetensors import write_sharded

    specs = checkpoint_specs(hf)
    by_name = {s[0]: s for s in specs}
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf, indent=1))
    shards = write_sharded(
        directory, [s[:3] for s in specs], lambda n: tensor_values(by_name[n], rng), shard_bytes
    )
    sizes = [nbytes(s) for s in specs]
    return {
        "layers": hf["num_hidden_layers"], "tensors": len(specs), "shards": len(shards),
        "bytes": sum(f.stat().st_size for f in directory.iterdir()), "largest": max(sizes),
        "largest_name": specs[sizes.index(max(sizes))][0], "gen_s": time.perf_counter() - t0,
    }  # fmt: skip


# ------------------------------------------------------------------------------------- page cache


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def resident_bytes(directory: Path) -> int | None:
    """Bytes of the shards in the page cache (util-linux `fincore`), None where it is missing."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-r", "-o", "RES", *map(str, shard_files(directory))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split())


def make_cold(directory: Path) -> None:
    """Drops the shards' clean pages from the page cache (no root needed, unlike drop_caches)."""
    for f in shard_files(directory):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_warm(directory: Path) -> None:
    for f in shard_files(directory):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass


# ------------------------------------------------------------------------------------- measured child


def child(src: str, out: str, dtype: str, prefetch: int, norelease: bool) -> None:
    """Runs in the measured subprocess: one import_checkpoint, then one JSON line on stdout."""
    t_start = time.perf_counter()
    import jax

    from deepseek_jax.convert import importer

    rss_ready = _status_kb(os.getpid()).get("VmRSS", 0) * 1024
    stats = {"loads": 0, "in_order": 0}
    if norelease:
        from deepseek_jax.convert.source import Source

        if not hasattr(Source, "release"):
            raise SystemExit("cold+norelease: this importer has no Source.release to turn off")
        Source.release = lambda self, name: None
    if prefetch:
        original = importer.lazy_tree

        def lazy_tree(src_obj, abstract, dt):
            tree = original(src_obj, abstract, dt)
            order = [
                fn.args[0].name(src_obj.layout)
                for leaf in jax.tree_util.tree_leaves(tree)
                for _, fn in leaf.pieces()
            ]  # the order write_tree produces the pieces in
            _wrap_load(src_obj, order, prefetch, stats)
            return tree

        importer.lazy_tree = lazy_tree
    t0 = time.perf_counter()
    importer.import_checkpoint(src, out, dtype=dtype, log=lambda s: print(s, file=sys.stderr))
    t1 = time.perf_counter()
    print(
        "RESULT "
        + json.dumps(dict(import_s=t1 - t0, startup_s=t0 - t_start, rss_ready=rss_ready, **stats))
    )


def _wrap_load(src, order: list[str], prefetch: int, stats: dict) -> None:
    """src.load, plus madvise WILLNEED (`SafetensorsDir.prefetch`) of the weights and scales of the
    next `prefetch` tensors of `order`, the order the importer loads them in."""
    load, files = src.load, src.files
    pos = {"i": 0}

    def stored(name: str) -> list[str]:
        ref = src.refs[name]
        return [ref.tensor] + ([ref.scale] if ref.scale else [])

    def wrapped(name: str):
        stats["loads"] += 1
        i = pos["i"]
        if i < len(order) and order[i] == name:
            stats["in_order"] += 1
        else:  # out of the expected order: resynchronise
            i = order.index(name, 0) if name in order else i
        pos["i"] = i + 1
        files.prefetch([t for n in order[i + 1 : i + 1 + prefetch] for t in stored(n)])
        return load(name)

    src.load = wrapped


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_import(src: Path, out: Path, dtype: str, prefetch: int, norelease: bool) -> dict:
    """One import in a fresh subprocess; its own rusage (wait4) and polled /proc RSS breakdown."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(src),
        str(out),
        dtype,
        str(prefetch),
        str(int(norelease)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = out.parent / f"{out.name}.log"
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = _status_kb(proc.pid)
            peak = {k: max(v, now.get(k, 0) * 1024) for k, v in peak.items()}
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"import child failed ({proc.returncode}); see {log}")
    result = json.loads(
        next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]
    )
    return dict(
        result,
        maxrss=usage.ru_maxrss * 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        anon_peak=peak["RssAnon"],
        file_peak=peak["RssFile"],
        child_wall=wall,
        out_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    )


# ------------------------------------------------------------------------------------- report


def code_hash() -> str:
    """A short hash of deepseek_jax/convert/*.py: the code measured (others may edit it during a run)."""
    h = hashlib.sha1()
    for f in sorted((ROOT / "deepseek_jax" / "convert").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        "?",
    )
    mem = (
        next(int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")) * 1024
    )
    import jax
    import numpy as np

    return (
        f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM; "
        f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}"
    )


HEADER = (
    "| size (GB) | layers | variant | on disk (GB) | shards | tensors | largest tensor (MB) | import (s) "
    "| MB/s | CPU (s) | peak RSS (GB) | max RssAnon / RssFile (GB) | RSS after imports (GB) | output (GB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(size: float, g: dict, variant: str, r: dict) -> str:
    return (
        f"| {size:g} | {g['layers']} | {variant} | {g['bytes'] / GB:.2f} | {g['shards']} | {g['tensors']} "
        f"| {g['largest'] / MB:.0f} | {r['import_s']:.1f} | {g['bytes'] / MB / r['import_s']:.0f} "
        f"| {r['cpu_s']:.0f} | {r['maxrss'] / GB:.2f} | {r['anon_peak'] / GB:.2f} / {r['file_peak'] / GB:.2f} "
        f"| {r['rss_ready'] / GB:.2f} | {r['out_bytes'] / GB:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sizes", default="2,8", help="checkpoint sizes on disk, GB (1e9 bytes), comma separated"
    )
    ap.add_argument(
        "--dir", type=Path, default=Path("/tmp/bench_convert"), help="where checkpoints are written"
    )
    ap.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="import dtype"
    )
    ap.add_argument(
        "--runs",
        default="cold,cold+prefetch,cold+norelease,warm",
        help=f"variants imported per size, comma separated, of {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--prefetch", type=int, default=4, help="tensors prefetched ahead in cold+prefetch"
    )
    ap.add_argument(
        "--vocab",
        type=int,
        default=DIMS["vocab_size"],
        help="vocab size: sets the largest tensors (embedding, head; BF16 vocab x 2048)",
    )
    ap.add_argument("--shard-mib", type=int, default=256, help="max shard size, MiB")
    ap.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoints and imports"
    )
    ap.add_argument("--out", type=Path, default=OUT_MD, help="results file")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        src, out, dtype, prefetch, norelease = ns.child
        return child(src, out, dtype, int(prefetch), bool(int(norelease)))

    DIMS["vocab_size"] = ns.vocab
    sizes = [float(s) for s in ns.sizes.split(",")]
    runs = ns.runs.split(",")
    if unknown := set(runs) - set(VARIANTS):
        ap.error(f"unknown --runs {sorted(unknown)}; choose from {VARIANTS}")
    if ns.dir.exists():
        ap.error(f"{ns.dir} exists; remove it or pass another --dir")
    command = "python experiments/bench_convert.py " + " ".join(sys.argv[1:])
    load0, t_all, code0 = os.getloadavg()[0], time.perf_counter(), code_hash()
    rows, notes = [], []
    print(HEADER, flush=True)
    try:
        for size in sizes:
            src = ns.dir / f"ckpt_{size:g}gb"
            g = generate(src, hf_config(plan_layers(size * GB)), ns.shard_mib * 2**20)
            gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            notes.append(
                f"{size:g} GB: {g['layers']} layers, generated in {g['gen_s']:.0f} s "
                f"({g['bytes'] / MB / g['gen_s']:.0f} MB/s; generator process peak RSS so far "
                f"{gen_rss / GB:.2f} GB); largest tensor {g['largest_name']}"
            )
            for variant in runs:
                (make_cold if variant.startswith("cold") else make_warm)(src)
                res = resident_bytes(src)
                out = ns.dir / f"out_{size:g}gb_{variant.replace('+', '_')}"
                r = run_import(
                    src,
                    out,
                    ns.dtype,
                    ns.prefetch if variant == "cold+prefetch" else 0,
                    variant == "cold+norelease",
                )
                rows.append(row(size, g, variant, r))
                print(rows[-1], flush=True)
                notes.append(
                    f"{size:g} GB {variant}: shards resident in page cache before the run "
                    f"{'?' if res is None else f'{res / GB:.2f} GB'}; child wall {r['child_wall']:.0f} s "
                    f"(start-up {r['startup_s']:.0f} s)"
                    + (
                        f"; Source.load calls {r['loads']}, in the predicted order {r['in_order']}"
                        if r["loads"]
                        else ""
                    )
                )
                if not ns.keep:
                    shutil.rmtree(out)
            if not ns.keep:
                shutil.rmtree(src)
    finally:
        if not ns.keep and ns.dir.exists():
            shutil.rmtree(ns.dir, ignore_errors=True)
    load1, total, code1 = os.getloadavg()[0], time.perf_counter() - t_all, code_hash()
    code = f"deepseek_jax/convert sources sha1 {code0}" + (
        "" if code1 == code0 else f" at start, {code1} at end: THEY CHANGED DURING THE RUN"
    )
    text = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {machine()}. Date: {date.today()}; {code}.",
            (
                f"1-min load average {load0:.1f} at start, {load1:.1f} at end (other jobs share the cores: "
                f"times are noisy, RSS is not). Total wall {total / 60:.0f} min. GB = 1e9 bytes, MB = 1e6 bytes."
            ),
            "",
            HEADER,
            *rows,
            "",
            (
                "Peak RSS = ru_maxrss of the import subprocess (os.wait4), Python + JAX start-up included; "
                "max RssAnon / RssFile = largest values polled from /proc/<pid>/status every 0.1 s (anonymous "
                "memory / file-backed pages mapped in: the mmap'd shards, and shared libraries, about 0.15 GB). "
                "import (s) = the import_checkpoint call only; MB/s = checkpoint bytes / import (s); "
                "CPU (s) = user + sys of the whole subprocess."
            ),
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    reading = ""
    if ns.out.exists() and "\n## Reading" in ns.out.read_text():
        reading = "\n## Reading" + ns.out.read_text().split("\n## Reading", 1)[1]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("# bench_convert\n\n" + text + reading)
    print("\n" + "\n".join(f"- {n}" for n in notes) + f"\n\nwritten to {ns.out}")


if __name__ == "__main__":
    main()
