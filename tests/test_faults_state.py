"""Faults of a run's state, through the CLI as a user meets them: a non-finite step saves nothing non-finite,
a poisoned checkpoint is refused, one writer per run directory (a SIGKILLed one frees it), a swapped
tokenizer or edited corpus is caught, a damaged newest checkpoint falls back to the step before, another
optimizer is named, and a training SIGKILLed again and again during saves ends bit-exact.

Each error is exit code 2 with one line `error: ...` naming the thing, and no traceback. One trained run
directory (module fixture) is copied by the tests that change it."""

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepseek_jax.checkpoint import Checkpointer, nonfinite_leaf
from deepseek_jax.cli import main
from deepseek_jax.metrics import read_metrics
from deepseek_jax.rundir import WriterLock
from tests.test_train import _env, _launch, _wait_for, train_losses, write_config
from tests.utils import ROOT

STEPS = {"steps": 4, "ckpt_every": 2}  # the shared run: checkpoints 2 and 4


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, pattern: str) -> None:
    """`err` ends in one `error: ...` line matching `pattern`, and holds no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A 4-step run (checkpoints 2 and 4) on its own copy of the corpus (a test edits it and puts it back)."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(corpus, root / "corpus")
    assert main(["train", str(write_config(root, root / "corpus", **STEPS))]) == 0
    return root


def _copy(trained: Path, tmp_path: Path, **train) -> Path:
    """A copy of the shared run directory and a config for it (train keys override)."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return write_config(tmp_path, trained / "corpus", **{**STEPS, **train})


def _stored_state(run_dir: Path, step: int):
    """A step's state as saved (no target: the arrays as stored), through Orbax directly."""
    ckpt = Checkpointer(run_dir, use_async=False, read_only=True)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                              data=ocp.args.JsonRestore(),
                                                              config=ocp.args.JsonRestore()))
    ckpt.close()
    return out


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # ~10-14 s: a train that compiles and an eval
def test_nonfinite_step_saves_nothing_nonfinite_and_eval_works(tmp_path, corpus, capsys):
    """lr=1e30 after a 2-step warmup: step 2's parameters are finite (~1e29) but overflow in step 3's forward
    pass. The run stops naming step 3; the checkpoint of step 2 is moved to diverged_checkpoints/, so the
    "last good" step 1 is what resume and eval see, and eval's loss is finite."""
    path = write_config(tmp_path, corpus, steps=6, ckpt_every=1)
    rc, _, err = _cli(capsys, "train", str(path), "optim.lr=1e30", "optim.clip_norm=0.0", "optim.warmup_steps=2")
    assert rc == 2
    _one_line_error(err, r"non-finite loss, gradient or update at step 3; stopped\. The parameters of step 2 gave "
                         r"it .* moved that checkpoint to .*diverged_checkpoints/2\. Last good checkpoint: step 1 ")
    run_dir = tmp_path / "run"
    assert _steps(run_dir) == [1]
    assert nonfinite_leaf(_stored_state(run_dir, 1).state) is None
    rc, out, _ = _cli(capsys, "eval", str(path))
    assert rc == 0 and np.isfinite(float(re.search(r"\bloss (\S+)", out)[1])), out


def test_hand_poisoned_checkpoint_is_refused_by_eval(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path)
    out = _stored_state(tmp_path / "run", 4)
    out.state["params"]["embedding"] = out.state["params"]["embedding"].at[0, 0].set(np.nan)
    ckpt = Checkpointer(tmp_path / "run", use_async=False)  # Checkpointer.save refuses it: write as Orbax would
    ckpt.manager.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(out.state),
                                                  data=ocp.args.JsonSave(out.data),
                                                  config=ocp.args.JsonSave(out.config)), force=True)
    ckpt.close()
    rc, _, err = _cli(capsys, "eval", str(path))
    assert rc == 2
    _one_line_error(err, r"checkpoint step 6 in .* holds non-finite values \(params/embedding\)")


def test_overflowing_checkpoint_is_an_eval_error_not_loss_nan(trained, tmp_path, capsys):
    """Finite parameters that overflow in the forward pass (a diverged run) give no `loss nan` with exit 0."""
    path = _copy(trained, tmp_path)
    out = _stored_state(tmp_path / "run", 4)
    out.state["params"]["w_head"] = out.state["params"]["w_head"] * np.float32(1e38)  # logits overflow to ±inf
    assert nonfinite_leaf(out.state) is None  # finite: the save goes through
    ckpt = Checkpointer(tmp_path / "run", use_async=False)
    ckpt.save(6, out.state, out.data, out.config)
    ckpt.close()
    rc, out_text, err = _cli(capsys, "eval", str(path))
    assert rc == 2 and "loss" not in out_text
    _one_line_error(err, r"validation loss is nan with the parameters of step \d+ of .*run: they overflow")


def test_sample_prompts_too_long_fail_before_training(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path)
    rc, _, err = _cli(capsys, "train", str(path), "train.steps=6", "train.sample_prompts=[x]", "train.sample_tokens=64")
    assert rc == 2
    _one_line_error(err, r"train\.sample_prompts: the longest is 1 tokens, \+ train\.sample_tokens=64 exceeds "
                         r"model\.max_seq_len=64")
    assert max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == 4


def test_second_writer_is_refused_and_a_killed_writer_frees_the_lock(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path, steps=400)
    first = _launch(tmp_path, path)
    lock = tmp_path / "run" / ".lock"

    def holds_lock():
        try:
            return json.loads(lock.read_text())["pid"] == first.pid
        except (OSError, ValueError, KeyError):
            return False

    try:
        _wait_for(holds_lock, first, timeout=120, poll=0.05)
        metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
        rc, _, err = _cli(capsys, "train", str(path))
        assert rc == 2
        _one_line_error(err, rf"run directory .*run is in use by another writer \(pid {first.pid} on host \S+ since "
                             r"\S+: .*deepseek_jax.*\); wait for it or use another train\.run_dir")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes()[: len(metrics)] == metrics  # the refused one wrote none
    again = WriterLock(tmp_path / "run")
    assert again.acquire() is None  # the kernel dropped the killed writer's lock
    again.release()


def _swap_two_tokens(tokenizer: Path) -> None:
    """Swaps the ids of two byte tokens: still a valid tokenizer of the same size, with other ids."""
    spec = json.loads(tokenizer.read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tokenizer.write_text(json.dumps(spec))


def test_swapped_tokenizer_is_refused_by_eval_and_resume(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path, steps=6)
    _swap_two_tokens(tmp_path / "run" / "tokenizer.json")
    for command in ("eval", "train"):
        rc, _, err = _cli(capsys, command, str(path))
        assert rc == 2, command
        _one_line_error(err, r"the tokenizer differs from the one run directory .* was trained with "
                             r"\(.*tokenizer\.json: sha256 [0-9a-f]{12} -> [0-9a-f]{12}")
    assert _steps(tmp_path / "run") == [2, 4]


def test_edited_corpus_is_refused_by_resume_and_a_warning_for_eval(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path, steps=6)
    doc = trained / "corpus" / "doc003.txt"
    original = doc.read_bytes()
    try:
        doc.write_bytes(original + b"\n# one more line\n")
        rc, _, err = _cli(capsys, "train", str(path))
        assert rc == 2
        _one_line_error(err, r"the data stream of data\.source .* differs from the one run directory .* was trained "
                             r"on \(fingerprint [0-9a-f]{12} -> [0-9a-f]{12}; 1 files differ: doc003\.txt\)\. Resuming")
        rc, out, err = _cli(capsys, "eval", str(path))
        assert rc == 0 and "loss" in out
        assert re.search(r"^warning: the data stream .* differs .*doc003\.txt", err, re.M), err
    finally:
        doc.write_bytes(original)


def test_eval_without_the_runs_tokenizer_trains_none(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path)
    (tmp_path / "run" / "tokenizer.json").unlink()
    rc, _, err = _cli(capsys, "eval", str(path))
    assert rc == 2
    _one_line_error(err, r"run/tokenizer\.json is missing: the checkpoints need the tokenizer they were trained with")
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_generate_reads_no_corpus_and_eval_logs_no_warning(trained, tmp_path, capsys, caplog):
    """A run directory used where its corpus is not (copied to another machine): generate works, checking the
    tokenizer only. Neither reader logs a warning (Orbax's read-only mode warned twice on every open)."""
    path, corpus = _copy(trained, tmp_path), trained / "corpus"
    corpus.rename(tmp_path / "corpus_elsewhere")
    try:
        rc, out, err = _cli(capsys, "generate", str(path), "--prompt", "def ", "--max-new-tokens", "2")
    finally:
        (tmp_path / "corpus_elsewhere").rename(corpus)
    assert rc == 0 and out.startswith("--- 'def '"), err
    rc, out, err = _cli(capsys, "eval", str(_copy(trained, tmp_path / "again")))
    assert rc == 0 and "loss" in out, err
    assert "WARNING" not in err and not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_refused_resume_records_no_fingerprints(trained, tmp_path, capsys):
    """A run directory from before fingerprints, resumed with a config its checkpoints refuse (another
    data.tokenizer): nothing is recorded, so the corrected resume is not refused for that tokenizer's hash."""
    path = _copy(trained, tmp_path, steps=6)
    (tmp_path / "run" / "fingerprints.json").unlink()
    other = shutil.copy(tmp_path / "run" / "tokenizer.json", tmp_path / "other_tokenizer.json")
    rc, _, err = _cli(capsys, "train", str(path), f"data.tokenizer={other}")
    assert rc == 2
    _one_line_error(err, r"incompatible config \(data\.tokenizer: '' -> '.*other_tokenizer\.json'")
    assert not (tmp_path / "run" / "fingerprints.json").exists()


@pytest.mark.parametrize("text, why", [("{}", "is missing the string tokenizer.path"),
                                       ('{"tokenizer": {"path": "t", "sha256": 1}}',
                                        "is missing the string tokenizer.sha256"),
                                       ("[1", "is not valid JSON")])
def test_malformed_fingerprints_file_is_named(trained, tmp_path, capsys, text, why):
    path = _copy(trained, tmp_path)
    (tmp_path / "run" / "fingerprints.json").write_text(text)
    rc, _, err = _cli(capsys, "eval", str(path))
    assert rc == 2
    _one_line_error(err, rf"run/fingerprints\.json {re.escape(why)}.*; delete it to record the current tokenizer")


def test_writer_lock_is_held_and_freed_when_its_description_cannot_be_written(tmp_path, monkeypatch):
    """A full disk while the lock file's text is written: the lock is still taken and, released, free."""
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    first = WriterLock(tmp_path)
    assert first.acquire() is None
    monkeypatch.undo()
    assert WriterLock(tmp_path).acquire() == "a process that has not yet recorded itself"  # held by `first`
    first.release()
    second = WriterLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_data_fingerprint_under_max_documents_covers_the_files_read(tmp_path):
    """With data.max_documents, files beyond those documents (a growing corpus) leave the fingerprint alone;
    an edit of a file read changes it."""
    from deepseek_jax.config import load_config
    from deepseek_jax.rundir import data_fingerprint

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        (corpus / f"{name}.txt").write_text(f"document {name}\n")
    cfg = load_config([str(write_config(tmp_path, corpus))], ["data.max_documents=2"])
    before = data_fingerprint(cfg)
    assert sorted(before["files"]) == ["a.txt", "b.txt"]
    (corpus / "d.txt").write_text("a new document\n")
    (corpus / "c.txt").write_text("edited after the documents read\n")
    assert data_fingerprint(cfg) == before
    (corpus / "b.txt").write_text("document b, edited\n")
    assert data_fingerprint(cfg)["sha256"] != before["sha256"]


def test_another_optimizer_on_resume_is_named(trained, tmp_path, capsys):
    path = _copy(trained, tmp_path, steps=6)
    rc, _, err = _cli(capsys, "train", str(path), "optim.name=muon")
    assert rc == 2
    _one_line_error(err, r"incompatible config \(optimizer optim\.name: 'adamw' -> 'muon'")


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _snapshot(run_dir: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def test_reader_falls_back_from_a_damaged_step_and_writes_nothing(trained, tmp_path, capsys):
    """eval on a run whose newest step lost a data file, beside a save in flight (its temporary folder):
    the step before is used, with a warning; nothing is moved, cleaned up or written."""
    path = _copy(trained, tmp_path)
    run_dir = tmp_path / "run"
    _largest_file(run_dir / "checkpoints" / "4" / "state" / "ocdbt.process_0").unlink()
    (run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a concurrent writer's save
    before = _snapshot(run_dir)
    rc, out, err = _cli(capsys, "eval", str(path))
    assert rc == 0 and "loss" in out, err
    assert re.search(r"^warning: checkpoint step 4 cannot be restored \(.*checkpoints/4/state", err, re.M), err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_file_and_completes(trained, tmp_path, capsys):
    """A truncated array file in the newest step: resume warns naming it, moves the step to damaged_checkpoints/,
    resumes from the step before and completes. The run directory also predates fingerprints.json: the
    start records them, with a note."""
    path = _copy(trained, tmp_path, steps=6)
    run_dir = tmp_path / "run"
    damaged = _largest_file(run_dir / "checkpoints" / "4" / "state" / "ocdbt.process_0")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    (run_dir / "fingerprints.json").unlink()
    rc, _, err = _cli(capsys, "train", str(path))
    assert rc == 0, err
    assert re.search(rf"^warning: checkpoint step 4 cannot be restored \(.*{damaged.name}", err, re.M), err
    assert "resuming at step 2" in err and "Traceback" not in err
    assert re.search(r"^note: .*fingerprints\.json recorded now", err, re.M)
    assert (run_dir / "fingerprints.json").exists()
    assert (run_dir / "damaged_checkpoints" / "4" / "state").is_dir()
    assert max(train_losses(run_dir)) == 6 and _steps(run_dir) == [2, 4, 6]


def _newer_step(ckpt_dir: Path, after: int):
    return lambda: ckpt_dir.exists() and max((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()),
                                             default=0) > after


def _save_in_flight(ckpt_dir: Path):
    return lambda: any("tmp" in p.name for p in ckpt_dir.iterdir())


@pytest.mark.slow
def test_repeated_sigkill_during_saves_resumes_bit_exact(tmp_path, corpus):
    """kill -9 five times, each at a random moment of a run that has progressed, as soon as an asynchronous
    save is in flight; resume each time, then finish: every logged loss equals an uninterrupted run's, bit
    for bit (the rows of steps run twice, before a kill and after its resume, included)."""
    config = {"steps": 40, "ckpt_every": 2, "keep_checkpoints": 2}
    reference = write_config(tmp_path / "ref", corpus, **config)
    straight = subprocess.run([sys.executable, "-m", "deepseek_jax", "train", str(reference)], cwd=ROOT,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    path = write_config(tmp_path / "killed", corpus, **config)
    run_dir = tmp_path / "killed" / "run"
    ckpt_dir, rng, landed, last = run_dir / "checkpoints", random.Random(0), 0, 0
    for _ in range(5):
        proc = _launch(tmp_path, path, "train.async_checkpoints=true")
        _wait_for(_newer_step(ckpt_dir, last), proc, timeout=300)  # progress since the last resume
        time.sleep(rng.uniform(0, 0.5))
        _wait_for(_save_in_flight(ckpt_dir), proc, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        landed += any("tmp" in p.name for p in ckpt_dir.iterdir())
        last = max(_steps(run_dir))
        assert last < config["steps"], "the run finished before it was killed"
    print(f"\n{landed} of 5 kills left a save half-written; last complete step {last}")
    assert landed >= 3, "the kills did not land during saves; the test saw too little"
    final = subprocess.run([sys.executable, "-m", "deepseek_jax", "train", str(path), "train.async_checkpoints=true"],
                           cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    want = train_losses(tmp_path / "ref" / "run")
    rows = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]
    assert sorted({step for step, _ in rows}) == sorted(want) == list(range(1, config["steps"] + 1))
    assert all(loss == want[step] for step, loss in rows)  # bit-identical floats
    assert not [p for p in ckpt_dir.iterdir() if "tmp" in p.name]
