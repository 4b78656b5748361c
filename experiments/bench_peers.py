"""Side-by-side training-step benchmark: this project, transformers and MaxText at MaxText's tiny DeepSeek dims.

For each model's dims (MaxText 0.2.5's `deepseek3-tiny` and `deepseek4-tiny`, in our schema in
configs/model/peers/), one table row per system, each run in its own process, one after another:

- this project: the real jitted train_step (build_program; loss, balance loss, AdamW, bias update) on random
  tokens, one row per `--ours` override set (none: the config as committed), and the same rows again under
  `--project-python` (e.g. MaxText's venv, whose JAX is newer; the repo goes on PYTHONPATH) so that the
  compiler is not the difference. Per row also XLA's compiled memory analysis (temp) and the compile time.
- transformers `DeepseekV3ForCausalLM` / `DeepseekV4ForCausalLM` in float32 at the same dims (the config dict
  comes from the project's tested converter, convert/v3.py / v4.py `config_to_json`, computed in a throw-away
  process so that JAX is not counted in torch's memory), torch.optim.AdamW (our betas, eps, weight decay) plus
  the same global-norm clip at 1.0; forward, backward and step on `torch.set_num_threads(os.cpu_count())`.
- MaxText, when `--maxtext-python` names an interpreter that has maxtext 0.2.5: `python -m
  maxtext.trainers.pre_train.train` on synthetic data, the dense MoE path (sparse_matmul=false) and the
  ragged, dropless one (sparse_matmul=true), megablox off, dot_product attention, `indexer_sparse_training=true`
  for deepseek4-tiny (its default is the indexer warm-up stage, whose LM loss is 0). `hardware=cpu` alone
  calls jax.distributed.initialize with XPK's environment variables, so `skip_jax_distributed_system=true`.
  MaxText's dtypes stay its defaults (read back from its log: dtype bfloat16 compute, weight_dtype float32;
  remat_policy full). Its per-step "seconds" are host intervals between dispatches: it keeps one step's
  metrics in flight, so the first two intervals are dispatch-only and later ones equal the step time; at least
  two warm-up steps are dropped for it.

Step time: the median of `--steps` steps after `--warmup` steps (each of ours and transformers' steps is timed
to completion). Tokens/s = batch x seq / median step. Ratios are tokens/s, ours / peer, at the same dims, in the
same run.

Peak RSS: every case is started through a tiny wrapper interpreter that runs it as its child and then reports
`getrusage(RUSAGE_CHILDREN).ru_maxrss`: the kernel's exact high-water mark of every descendant it waited for (no
sampling, unlike polling /proc/<pid>/status VmHWM, which misses the rise after the last poll and needs a walk
of the process tree). It must be a fresh, small wrapper: ru_maxrss survives fork + exec, so a case started
directly by a large process (a pytest run late in the suite, or a parent that had imported JAX) would inherit
that parent's size as its floor; the wrapper's own ~10 MB is the floor here.

    python experiments/bench_peers.py                                   # ours + transformers, 8 x 256
    python experiments/bench_peers.py --maxtext-python /path/venv/bin/python \\
        --project-python /path/venv/bin/python --ours "model.moe.impl=dense"
    python experiments/bench_peers.py --shrink --batch 2 --seq 64 --steps 1 --warmup 1   # smoke test

Writes experiments/results/bench_peers.md (a hand-written "## Reading" section there is kept).
"""

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "bench_peers.md"
PEERS = {  # MaxText model_name -> our config of its dims
    "deepseek3-tiny": "configs/model/peers/maxtext_deepseek3_tiny.yaml",
    "deepseek4-tiny": "configs/model/peers/maxtext_deepseek4_tiny.yaml",
}
MAXTEXT_MODULE = "maxtext.trainers.pre_train.train"
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}
WRAPPER = ("import resource, subprocess, sys\nrc = subprocess.call(sys.argv[1:])\n"
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
           "sys.exit(rc if rc >= 0 else 128 - rc)")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The children: one case each, in its own process


def ours_child(spec: dict) -> dict:
    """This project's train step at the peer's dims (+ overrides): compile, then warm-up + timed steps."""
    import jax
    import numpy as np

    from deepseek_jax.config import Config, DataConfig, OptimConfig, TrainConfig, load_model_config
    from deepseek_jax.plan.report import memory
    from deepseek_jax.program import build_program
    from deepseek_jax.sharding import make_mesh, rules

    model_cfg = load_model_config([ROOT / spec["config"]], spec["overrides"])
    B, T, V = spec["batch"], spec["seq"], model_cfg.vocab_size
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=T, global_batch_size=B), optim=OptimConfig(),
                 train=TrainConfig(steps=1000))  # fmt: skip
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    t0 = time.perf_counter()
    compiled = p.lower().compile()
    compile_s, mem = time.perf_counter() - t0, memory(compiled)
    state, rng, times, first_loss = p.init_state(), np.random.default_rng(0), [], None
    for _ in range(spec["warmup"] + spec["steps"]):
        batch = jax.device_put({
            "tokens": rng.integers(0, V, (B, T)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
            "segment_ids": np.ones((B, T), np.int32),
            "loss_mask": np.ones((B, T), np.float32) * (np.arange(T) < T - 1),
        }, p.batch_sharding)  # fmt: skip
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        first_loss = float(metrics["loss"]) if first_loss is None else first_loss
    return {"times": times, "compile_s": compile_s, "temp_gb": mem["temp"] / 2**30, "first_loss": first_loss,
            "dtype": model_cfg.dtype, "system": f"this project (jax {jax.__version__})",
            "notes": f"moe.impl {model_cfg.moe.impl}, remat {model_cfg.remat}; "
                     f"XLA peak {mem['peak_estimate'] / 2**30:.2f} GB"}  # fmt: skip


def hf_config_child(spec: dict) -> dict:
    """The transformers config dict of our config (convert's config_to_json); run in a throw-away process."""
    from deepseek_jax.config import load_model_config
    from deepseek_jax.convert import v3, v4

    cfg = load_model_config([ROOT / spec["config"]], spec["overrides"])
    return {"hf_config": (v4 if cfg.v4 is not None else v3).config_to_json(cfg)}


def hf_child(spec: dict) -> dict:
    """transformers' DeepseekV3/V4ForCausalLM in float32: forward + backward + clip + AdamW step."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf = dict(spec["hf_config"])
    arch = hf.pop("architectures")[0]
    hf.pop("model_type")
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf)
    model = getattr(transformers, arch)(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    B, T, V = spec["batch"], spec["seq"], config.vocab_size
    gen, times, first_loss = torch.Generator().manual_seed(0), [], None
    for _ in range(spec["warmup"] + spec["steps"]):
        tokens = torch.randint(0, V, (B, T), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        first_loss = loss.item() if first_loss is None else first_loss
    experts = getattr(config, "_experts_implementation", None)
    return {"times": times, "first_loss": first_loss, "dtype": "float32",
            "system": f"transformers {transformers.__version__} (torch {torch.__version__.split('+')[0]})",
            "notes": f"{arch}, attention {config._attn_implementation}, experts {experts}, "
                     f"{torch.get_num_threads()} threads"}  # fmt: skip


CHILDREN = {"ours": ours_child, "hf": hf_child, "hf_config": hf_config_child}


# ----------------------------------------------------------------------------------------------
# The parent: cases, measurement, MaxText's log, the table


def measured(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> dict:
    """Runs cmd under the RSS wrapper: {rc, out (stdout + stderr), rss_gb, wall_s}; killed at `timeout`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        out, rc = proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper's own session: it and the case
        out, rc = proc.communicate()[0], None
    peak = re.findall(r"^PEAK_RSS_KB (\d+)$", out, re.M)
    return {"rc": rc, "out": out, "rss_gb": int(peak[-1]) / 2**20 if peak else None,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def failure(run: dict, timeout: float) -> str:
    if run["rc"] is None:
        return f"killed at --time-limit {timeout:.0f} s"
    lines = [x for x in run["out"].splitlines() if x.strip() and not x.startswith("PEAK_RSS_KB")]
    return f"failed (rc {run['rc']}: {(lines or ['?'])[-1][:160]})".replace("|", "/")


def run_child(kind: str, spec: dict, ns, python: str | None = None) -> dict:
    """A child of this script (under `python`, default this interpreter): its RESULT plus rss_gb and wall_s,
    or {"skip": why}."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if python:  # another venv: our package from this checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    run = measured(cmd, env, ns.time_limit)
    lines = [x for x in run["out"].splitlines() if x.startswith(RESULT)]
    if run["rc"] != 0 or not lines:
        return {"skip": failure(run, ns.time_limit), "wall_s": run["wall_s"]}
    return {**json.loads(lines[-1][len(RESULT) :]), "rss_gb": run["rss_gb"], "wall_s": run["wall_s"]}


def shrink_overrides(config: str) -> list[str]:
    """Overrides that cut a peer config to at most 4 layers (1 dense) and a 512-token vocabulary, keeping its
    per-layer pattern's head (smoke tests only)."""
    m = yaml.safe_load((ROOT / config).read_text())["model"]
    n = min(m["n_layers"], 4)
    out = [f"model.n_layers={n}", f"model.n_dense_layers={min(m['n_dense_layers'], 1)}",
           f"model.vocab_size={min(m['vocab_size'], 512)}"]  # fmt: skip
    if m.get("compress_ratios"):
        out.append(f"model.compress_ratios={m['compress_ratios'][:n] + m['compress_ratios'][m['n_layers']:]}")
    if m["moe"].get("n_hash_layers"):
        out.append(f"model.moe.n_hash_layers={min(m['moe']['n_hash_layers'], n - min(m['n_dense_layers'], 1))}")
    return out


STEP_RE = re.compile(r"completed step: (\d+), seconds: ([^,\s]+),.*? loss: ([^,\s]+)")
MEM_RE = re.compile(r"\[train\] Total estimated memory size: ([\d.]+) GB.*?estimated temp size: ([\d.]+) GB")
PARAM_RE = re.compile(r"Config param (dtype|weight_dtype|remat_policy): (\S+)")
# absl's line prefix (I1205 15:03:33.505437 ...), then the text sought
STAMP_RE = r"^[IWE]\d{{4}} (\d\d):(\d\d):(\d\d\.\d+) .*{}"


def log_span_s(text: str, first: str, last: str) -> float | None:
    """Seconds from the first log line containing `first` to the first containing `last` (within a day)."""
    a, b = (re.search(STAMP_RE.format(re.escape(key)), text, re.M) for key in (first, last))
    if not (a and b):
        return None
    seconds = lambda m: int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])  # noqa: E731
    return (seconds(b) - seconds(a)) % 86400


def parse_maxtext_log(text: str, warmup: int) -> dict:
    """Per-step seconds (the intervals after `warmup` steps), first loss, its memory line and dtypes from a
    MaxText train log; raises ValueError when no step line survives the warm-up."""
    steps = {int(s): (float(sec), float(loss)) for s, sec, loss in STEP_RE.findall(text)}
    times = [steps[s][0] for s in sorted(steps) if s >= warmup]
    if not times:
        raise ValueError(f"MaxText log: no 'completed step: N, seconds: ...' line after {warmup} warm-up steps")
    params = dict(PARAM_RE.findall(text))
    mem = MEM_RE.search(text)
    notes = [f"weights {params.get('weight_dtype', '?')}", f"remat {params.get('remat_policy', '?')}"]
    if mem:
        notes.append(f"its memory line: total {mem[1]} GB, temp {mem[2]} GB")
    return {"times": times, "first_loss": steps[min(steps)][1], "dtype": params.get("dtype", "?"),
            "temp_gb": float(mem[2]) if mem else None, "notes": ", ".join(notes),
            "compile_s": log_span_s(text, "No existing checkpoints found", "[train] Total estimated memory size")}


def run_maxtext(model: str, sparse: bool, ns) -> dict:
    """One MaxText training run (its own process, under the RSS wrapper) parsed into a row."""
    warmup = max(ns.warmup, 2)  # its first two intervals are dispatch-only (module docstring)
    with tempfile.TemporaryDirectory(prefix="bench_peers_maxtext_") as tmp:
        args = [f"model_name={model}", "hardware=cpu", "skip_jax_distributed_system=true", "dataset_type=synthetic",
                "attention=dot_product", "megablox=false", f"sparse_matmul={str(sparse).lower()}",
                f"per_device_batch_size={ns.batch}", f"max_target_length={ns.seq}", f"steps={warmup + ns.steps}",
                "enable_checkpointing=false", f"base_output_directory={tmp}", "run_name=bench_peers"]  # fmt: skip
        args += ["indexer_sparse_training=true"] if model == "deepseek4-tiny" else []
        env = {**os.environ, "DECOUPLE_GCLOUD": "TRUE", "JAX_PLATFORMS": "cpu"}
        run = measured([ns.maxtext_python, "-m", MAXTEXT_MODULE, *args], env, ns.time_limit, cwd=Path(tmp))
    row = {"system": f"MaxText {ns.versions['maxtext']} (jax {ns.versions['jax']})", "rss_gb": run["rss_gb"],
           "wall_s": run["wall_s"], "variant": "ragged, dropless (sparse_matmul=true)" if sparse
           else "dense (sparse_matmul=false)"}  # fmt: skip
    if run["rc"] != 0:
        return {**row, "skip": failure(run, ns.time_limit)}
    try:
        return {**row, **parse_maxtext_log(run["out"], warmup)}
    except ValueError as e:
        return {**row, "skip": str(e)}


def versions(python: str) -> dict:
    """jax and maxtext versions installed for another interpreter (package metadata; nothing imported);
    raises ValueError naming the interpreter when it lacks either."""
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('jax', 'maxtext')}))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"{python} has no jax / maxtext package ({(proc.stderr.strip().splitlines() or ['?'])[-1]})")
    return json.loads(proc.stdout)


def model_rows(model: str, ns) -> list[dict]:
    """Every case of one model's dims, run one after another."""
    config = PEERS[model]
    base = shrink_overrides(config) if ns.shrink else []
    spec = {"config": config, "batch": ns.batch, "seq": ns.seq, "steps": ns.steps, "warmup": ns.warmup}
    rows = []
    for python in [None, ns.project_python] if ns.project_python else [None]:
        for extra in [[], *(ns.ours or [])]:
            row = run_child("ours", {**spec, "overrides": base + extra}, ns, python)
            system = f"this project{f' under {python}' if python else ''}"
            rows.append({"system": system, **row, "variant": " ".join(extra) or "as committed"})
            log(model, rows[-1])
    hf = run_child("hf_config", {**spec, "overrides": base}, ns)
    row = hf if "skip" in hf else run_child("hf", {**spec, "hf_config": hf["hf_config"]}, ns)
    rows.append({"system": "transformers", **row, "variant": "float32, no torch.compile"})
    log(model, rows[-1])
    if ns.maxtext_python:
        for sparse in (False, True):
            rows.append(run_maxtext(model, sparse, ns))
            log(model, rows[-1])
    return [{**r, "model": model} for r in rows]


def log(model: str, row: dict) -> None:
    keys = ("system", "variant", "skip", "rss_gb", "wall_s", "first_loss")
    print(f"  {model}: " + ", ".join(f"{k} {row[k]:.3g}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                                     for k in keys if row.get(k) is not None), file=sys.stderr, flush=True)  # fmt: skip


def add_rates(rows: list[dict], ns) -> None:
    """Median step, tokens/s and, on our rows, the tokens/s ratios to the best MaxText row and to transformers."""
    for r in rows:
        if r.get("times"):
            r["step_s"] = statistics.median(r["times"][-ns.steps :])
            r["tokens_per_s"] = ns.batch * ns.seq / r["step_s"]
    for r in rows:
        same = [x for x in rows if x["model"] == r["model"] and x.get("tokens_per_s")]
        mtx = [x["tokens_per_s"] for x in same if x["system"].startswith("MaxText")]
        hf = [x["tokens_per_s"] for x in same if x["system"].startswith("transformers")]
        if r["system"].startswith("this project") and r.get("tokens_per_s"):
            r["x_maxtext"] = r["tokens_per_s"] / max(mtx) if mtx else None
            r["x_hf"] = r["tokens_per_s"] / hf[0] if hf else None


def fmt_table(rows: list[dict]) -> list[str]:
    lines = ["| model dims | system | variant | compute dtype | s/step | tokens/s | x best MaxText | x transformers "
             "| peak RSS (GB) | XLA temp (GB) | compile (s) | first loss | wall (s) | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        num = lambda key, f: f.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        if "skip" in r:
            lines.append(f"| {r['model']} | {r['system']} | {r['variant']} | not run: {r['skip']} |" + " |" * 9
                         + f" {num('wall_s', '{:.0f}')} | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['model']} | {r['system']} | {r['variant']} | {r['dtype']} | {num('step_s', '{:.3f}')} "
            f"| {num('tokens_per_s', '{:,.0f}')} | {num('x_maxtext', '{:.2f}')} | {num('x_hf', '{:.2f}')} "
            f"| {num('rss_gb', '{:.2f}')} | {num('temp_gb', '{:.2f}')} | {num('compile_s', '{:.1f}')} "
            f"| {num('first_loss', '{:.4f}')} | {num('wall_s', '{:.0f}')} | {r.get('notes', '')} |"
        )
    return lines


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {cpu}, {ram:.0f} GB RAM, CPU only (parent python {platform.python_version()})"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(PEERS), default=list(PEERS), help="MaxText model dims")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (MaxText: per_device_batch_size)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (MaxText: max_target_length)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (MaxText: at least 2)")
    ap.add_argument("--ours", action="append", type=shlex.split, metavar="'KEY=VALUE ...'",
                    help="one more row of ours with these overrides (repeatable; the committed config always runs)")
    ap.add_argument("--project-python", help="also run our rows under this interpreter (repo on PYTHONPATH)")
    ap.add_argument("--maxtext-python", help="an interpreter with maxtext 0.2.5: adds its two rows per model")
    ap.add_argument("--shrink", action="store_true", help="cut ours and transformers to 4 layers, vocab 512 (smoke)")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds per case (killed after)")
    ap.add_argument("--out", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    if ns.shrink and ns.maxtext_python:
        ap.error("--shrink cuts ours and transformers only; MaxText runs at its own dims (drop --maxtext-python)")
    for flag in ("project_python", "maxtext_python"):
        path = getattr(ns, flag)
        if path and not os.access(path, os.X_OK):
            ap.error(f"--{flag.replace('_', '-')}: {path} is not an executable interpreter")
    if ns.steps < 1 or ns.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {ns.steps}, {ns.warmup}")
    try:
        ns.versions = versions(ns.maxtext_python) if ns.maxtext_python else {}
    except ValueError as e:
        ap.error(f"--maxtext-python: {e}")
    return ns


def header(ns, argv, load0: float, load1: float, wall: float) -> list[str]:
    peers = ", ".join(f"{m} = {PEERS[m]}" for m in ns.models)
    return [
        f"Command: `python experiments/bench_peers.py {' '.join(argv)}`".replace("  ", " "),
        "",
        f"Machine: {machine()}. Date: {date.today().isoformat()}. XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`.",
        f"Dims: {peers}{' (cut by --shrink)' if ns.shrink else ''}. Batch {ns.batch} x {ns.seq} random tokens; "
        f"s/step = median of {ns.steps} steps after {ns.warmup} warm-up steps (MaxText: after max(2, warm-up)). "
        "Each case in its own process, one at a time; peak RSS = the case process's high-water mark.",
        "Ratios: tokens/s of the row over the best MaxText row / the transformers row of the same dims. "
        "XLA temp: compiled.memory_analysis() temp bytes (MaxText: its own '[train] ... estimated temp size'). "
        "Compile: ours lower + compile of the train step; MaxText the span of its log from its checkpoint-restore "
        "line to its memory line (state init, trace, compile).",
        f"1-min load average {load0:.2f} at start, {load1:.2f} at end (other jobs share the cores: compare ratios "
        f"within this table). Total wall {wall:.0f} s.",
        "",
    ]


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse(argv)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows = [r for model in ns.models for r in model_rows(model, ns)]
    add_rates(rows, ns)
    table = "\n".join(header(ns, argv, load0, os.getloadavg()[0], time.perf_counter() - t0) + fmt_table(rows))
    print(table)
    reading = ""  # a hand-written "## Reading" section in the output file is kept
    if ns.out.exists() and "\n## Reading" in ns.out.read_text():
        reading = "\n## Reading" + ns.out.read_text().split("\n## Reading", 1)[1]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("# bench_peers\n\n" + table + "\n" + reading)
    print(f"\nwritten to {ns.out}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(RESULT + json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
    else:
        main()
