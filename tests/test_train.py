"""The training loop end to end on a small model and corpus: loss falls, exact resume, SIGTERM,
a SIGKILL in the middle of a checkpoint save, non-finite losses, incompatible run directories
(tests/test_faults_state.py has the other faults: writers, fingerprints, damaged checkpoints)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.metrics import read_metrics
from deepseek_jax.run import TrainingError, run
from tests.utils import ROOT

pytestmark = pytest.mark.slow
SMALL_MODEL = {
    "vocab_size": 512, "dim": 64, "inter_dim": 128, "n_layers": 2, "n_dense_layers": 1,
    "max_seq_len": 64, "num_nextn_predict_layers": 1, "dtype": "float32",
    "mla": {"n_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16},
    "moe": {"n_routed_experts": 8, "n_activated_experts": 2, "n_expert_groups": 2, "n_limited_groups": 1,
            "moe_inter_dim": 32, "route_scale": 2.5},
}


def write_config(tmp_path: Path, corpus: Path, **train) -> Path:
    cfg = {
        "model": SMALL_MODEL,
        "mesh": {"shape": [1, 1, 1, 1, 1]},  # one device (the test process fakes 8 CPU devices)
        "data": {"source": str(corpus), "tokenizer_vocab_size": 300, "seq_len": 32, "global_batch_size": 4,
                 "val_fraction": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 20, "run_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 0,
                  "eval_batches": 2, "ckpt_every": 5, "async_checkpoints": False, "sample_prompts": [],
                  "peak_flops": 1e11, **train},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_loss_falls_and_metrics_are_logged(tmp_path, corpus):
    cfg = load_config([write_config(tmp_path, corpus)])
    out = run(cfg)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 20
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (18, 19, 20)])
    print(f"\nloss steps 1-3 {first:.3f} -> steps 18-20 {last:.3f}; eval {out['eval']}")
    assert last < first - 0.5
    record = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"][-1]
    for key in ("grad_norm", "lr", "mtp_loss", "balance_loss", "tokens_per_sec", "mfu", "bias_min", "bias_max",
                "load_max_over_mean_max"):
        assert key in record, key
    assert record["bias_max"] > record["bias_min"]  # the aux-free update moved the biases
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert np.isfinite(out["eval"]["loss"])


def test_resume_is_bit_exact(tmp_path, corpus):
    """2N steps in one go == N steps, stop, resume for N more (losses, data order included)."""
    straight = load_config([write_config(tmp_path / "a", corpus)])
    run(straight)
    cfg_b = write_config(tmp_path / "b", corpus)
    run(load_config([cfg_b], ["train.stop_at=10"]))
    assert max(train_losses(tmp_path / "b" / "run")) == 10
    run(load_config([cfg_b]))
    want, got = train_losses(tmp_path / "a" / "run"), train_losses(tmp_path / "b" / "run")
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(1, 21)] == [want[s] for s in range(1, 21)]  # bit-identical floats


def test_incompatible_run_directory_is_refused(tmp_path, corpus):
    path = write_config(tmp_path, corpus, steps=5)
    run(load_config([path]))
    with pytest.raises(ConfigError, match=r"incompatible config.*model\.dim: 64 -> 96"):
        run(load_config([path], ["model.dim=96"]))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    path = write_config(tmp_path, corpus, ckpt_every=1)
    cfg = load_config([path], ["optim.lr=1e30", "optim.clip_norm=0.0", "optim.warmup_steps=0"])
    with pytest.raises(TrainingError, match=r"non-finite loss, gradient or update at step (\d+)") as err:
        run(cfg)
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    # step 1's parameters (~1e30) are finite but overflow in step 2's forward: that checkpoint is moved aside
    assert bad == 2 and ckpts == [] and (tmp_path / "run" / "diverged_checkpoints" / "1").is_dir()
    losses = train_losses(tmp_path / "run")
    assert all(np.isfinite(losses[s]) for s in losses if s < bad)


def test_skip_nonfinite_steps_keeps_training(tmp_path, corpus):
    path = write_config(tmp_path, corpus, steps=6, skip_nonfinite_steps=True)
    run(load_config([path], ["optim.lr=1e30", "optim.clip_norm=0.0", "optim.warmup_steps=0"]))
    records = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(records) == 6 and sum(r["skipped"] for r in records) >= 1


def _env(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "deepseek_jax_xla_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    return env


def _launch(tmp_path, path, *overrides):
    cmd = [sys.executable, "-m", "deepseek_jax", "train", str(path), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(pred, proc, timeout=240.0, poll=0.002):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(poll)


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    path = write_config(tmp_path, corpus, steps=400, ckpt_every=0)
    proc = _launch(tmp_path, path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received: saved step" in out
    saved = int(out.split("saved step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [saved] and saved < 400


def test_sigkill_during_save_never_leaves_a_half_checkpoint(tmp_path, corpus):
    path = write_config(tmp_path, corpus, steps=400, ckpt_every=2)
    proc = _launch(tmp_path, path, "train.async_checkpoints=true")
    ckpt_dir = tmp_path / "run" / "checkpoints"

    def second_save_in_flight():
        if not ckpt_dir.exists():
            return False
        names = [p.name for p in ckpt_dir.iterdir()]
        return any("tmp" in n for n in names) and any(n.isdigit() for n in names)

    _wait_for(second_save_in_flight, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    partial = [p.name for p in ckpt_dir.iterdir() if "tmp" in p.name]
    complete = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    print(f"\nkilled with {partial} in flight; complete checkpoints {complete}")
    assert partial, "the kill did not land during a save; the test saw nothing"
    resumed = subprocess.run([sys.executable, "-m", "deepseek_jax", "train", str(path), "train.stop_at=" +
                              str(max(complete) + 2)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at step {max(complete)}" in resumed.stdout + resumed.stderr
    assert not [p for p in ckpt_dir.iterdir() if "tmp" in p.name]  # leftovers cleaned up
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= max(complete)


def test_cli_eval_generate_and_config_show(tmp_path, corpus, capsys):
    from deepseek_jax.cli import main

    path = write_config(tmp_path, corpus, steps=3)
    assert main(["eval", str(path)]) == 2  # nothing trained yet: a clear error, not a traceback
    assert "no checkpoint in" in capsys.readouterr().err
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "perplexity" in out
    assert main(["generate", str(path), "--prompt", "def f(", "--max-new-tokens", "5", "--temperature", "0.7"]) == 0
    assert "--- 'def f('" in capsys.readouterr().out
    assert main(["config", "show", str(path), "data.seq_len=16"]) == 0
    assert "seq_len: 16" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=128", r"data\.seq_len=128 exceeds model\.max_seq_len=64"),
    ("data.source=/nonexistent/corpus", r"/nonexistent/corpus"),
    ("model.vocab_size=200", r"vocab"),
])
def test_bad_input_is_a_clear_error(tmp_path, corpus, capsys, override, message):
    from deepseek_jax.cli import main

    assert main(["train", str(write_config(tmp_path, corpus)), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
