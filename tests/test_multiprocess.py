"""Multi-process training on one machine: 2 processes x 4 CPU devices, joined by `jax.distributed` over
127.0.0.1, train on one fsdp_ep mesh spanning both, checkpoint, and resume in a fresh 2-process run; the
checkpoint also restores, resharded, in 1 process x 8 devices (tests/mp_worker.py, the `eval` path).

Every run is a subprocess: a process's device count and distributed set-up are fixed at its start.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from deepseek_jax.config import load_config
from deepseek_jax.data import list_documents, load_tokenizer, make_iterator
from deepseek_jax.metrics import read_metrics
from tests.utils import ROOT

pytestmark = pytest.mark.slow  # 1.5-3 minutes on a busy 2-core machine: three runs, each compiling
# fsdp 2 x expert 4 over 8 devices: FSDP gathers cross the processes, the MoE dispatches over experts
MESH = ROOT / "configs" / "mesh" / "fsdp_ep.yaml"
TIMEOUT = 600  # seconds per run
# One MoE layer and no MTP module: the distributed plumbing, not the model, is under test; fewer
# layers and LLVM's cheap passes keep each process's compile short on a 2-core machine.
MODEL = {
    "vocab_size": 512, "dim": 64, "inter_dim": 128, "n_layers": 1, "n_dense_layers": 0,
    "max_seq_len": 64, "num_nextn_predict_layers": 0, "dtype": "float32",
    "mla": {"n_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16},
    "moe": {"n_routed_experts": 8, "n_activated_experts": 2, "n_expert_groups": 2, "n_limited_groups": 1,
            "moe_inter_dim": 32, "route_scale": 2.5, "impl": "blocked"},
}
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def write_run(tmp_path: Path) -> Path:
    """A corpus whose validation documents are short and of different lengths, so the two processes'
    validation shards end after different numbers of batches; and a config training on it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for i, f in enumerate(sources):
        (corpus / f"doc{i:03d}.txt").write_text(f.read_text(errors="ignore")[:8000])
    data = {"source": str(corpus), "tokenizer_vocab_size": 300, "seq_len": 32, "global_batch_size": 8,
            "val_fraction": 0.1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL, "data": data, "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 5, "run_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 0,
                  "eval_batches": 20, "ckpt_every": 0, "sample_prompts": [], "peak_flops": 1e11},
    }))
    validation = list_documents(load_config([path]).data, "validation")
    assert len(validation) >= 3, "the corpus needs a few validation documents"
    for i, (doc, _, _) in enumerate(validation.refs):
        Path(doc).write_text(Path(doc).read_text()[: 300 + 250 * i])
    return path


def _env(n_devices: int) -> dict:
    cache = os.environ.get("DEEPSEEK_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "deepseek_jax_xla_cache"))
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n_devices),
                XLA_FLAGS=XLA_FLAGS, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(cmds: list[list[str]], n_devices: int, logs: Path) -> list[str]:
    """Runs the commands concurrently (one process each); returns their outputs, or fails with all of them."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [logs / f"process_{i}.log" for i in range(len(cmds))]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(n_devices), stdout=f.open("w"), stderr=subprocess.STDOUT)
             for cmd, f in zip(cmds, files)]
    deadline = time.time() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [f.read_text() for f in files]
    if any(p.returncode for p in procs):
        report = "\n".join(f"===== {' '.join(c)} (exit {p.returncode})\n{o[-6000:]}" for c, p, o in zip(cmds, procs, outs))
        pytest.fail(f"a process failed or timed out after {TIMEOUT}s:\n{report}")
    return outs


def train_2_processes(cfg: Path, *overrides: str, logs: Path) -> list[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "deepseek_jax", "train", str(cfg), str(MESH), *overrides,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return run_processes([cmd + ["--process-id", str(i)] for i in range(2)], 4, logs)


def validation_shards(cfg_path: Path, run_dir: Path, process_count: int) -> list[tuple[int, float]]:
    """(batches, target tokens) of each process's validation shard, with the run's tokenizer."""
    cfg = load_config([cfg_path])
    tokenizer = load_tokenizer(cfg.data, run_dir, cfg.model.vocab_size)
    out = []
    for i in range(process_count):
        it = make_iterator(cfg.data, "validation", tokenizer, process_index=i, process_count=process_count)
        batches = list(it)
        it.close()
        out.append((len(batches), float(sum(b["loss_mask"].sum() for b in batches))))
    return out


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_two_processes_train_checkpoint_resume_and_restore_in_one(tmp_path):
    cfg = write_run(tmp_path)
    run_dir, t0 = tmp_path / "run", time.time()

    # (a) 2 processes x 4 devices: 3 of 5 steps, then a checkpoint (the schedule stays that of 5 steps)
    out0, out1 = train_2_processes(cfg, "train.stop_at=3", logs=tmp_path / "a")
    assert "starting in" in out0 and "(8 cpu devices, 2 processes)" in out0
    assert "validation loss" in out0 and "validation loss" not in out1  # only process 0 reports
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3]  # one logger, not one per process
    data_files = sorted(p.name for p in (run_dir / "checkpoints" / "3" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's data position
    # the shards end after different numbers of batches, yet eval covered both in full, in lockstep
    (n0, tokens0), (n1, tokens1) = validation_shards(cfg, run_dir, 2)
    assert n0 != n1 and max(n0, n1) <= 20
    assert [r["tokens"] for r in read_metrics(run_dir) if r["split"] == "eval"] == [tokens0 + tokens1]
    t_a = time.time()

    # (b) a fresh pair resumes from step 3, each process from its own data position, and reaches step 5
    out0, _ = train_2_processes(cfg, logs=tmp_path / "b")
    assert "resuming at step 3" in out0 and "data stream restarts" not in out0
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4, 5]
    assert all(r["loss"] is not None for r in train_records(run_dir))
    evals = [r for r in read_metrics(run_dir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 5] and evals[1]["tokens"] == tokens0 + tokens1
    t_b = time.time()

    # (c) 1 process x 8 devices restores step 5, resharded, and evaluates it (what `eval` does)
    (out,) = run_processes([[sys.executable, str(ROOT / "tests" / "mp_worker.py"), str(cfg), str(MESH)]], 8,
                           tmp_path / "c")
    report = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    print(f"\n(a) {t_a - t0:.0f}s (b) {t_b - t_a:.0f}s (c) {time.time() - t_b:.0f}s; 1-process restore: {report}")
    assert report["step"] == report["int_step"] == 5
    assert report["param_devices"] == [8]
    assert report["max_abs_diff"] == 0.0 and report["n_leaves"] > 10  # every array as saved, bit for bit
    # another process layout: the data positions of 2 processes cannot resume 1, so none is restored
    assert report["data_state"] is None and report["data_files"] == data_files
    ((_, tokens),) = validation_shards(cfg, run_dir, 1)
    assert report["eval"]["tokens"] == tokens and 0 < report["eval"]["loss"] < 10
