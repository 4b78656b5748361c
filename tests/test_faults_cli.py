"""The CLI's error boundary as a user meets it: every bad flag, file or failure is one line `error: ...` naming
it, exit 2 (1 for a bug, 130 for Ctrl-C), no traceback unless --debug; `~` in every path argument. All cases
fail before any checkpoint load or compile (in-process `cli.main`), but one real process for the exit code."""

import errno
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import yaml

from deepseek_jax import cli
from deepseek_jax.generate import check_sampling, sample_logits
from deepseek_jax.inspect_model import InputError
from tests.test_train import write_config
from tests.utils import ROOT

TRAIN_MM = str(ROOT / "configs" / "train" / "tiny_multimodal.yaml")  # a model with image, audio and video input


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `deepseek-jax ARGV` in this process."""
    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.mark.parametrize("argv, names", [
    (["generate", "--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    (["generate", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    (["generate", "--temperature", "-0.5"], ["--temperature", "-0.5"]),
    (["generate", "--temperature", "nan"], ["--temperature", "nan"]),
    (["generate", "--temperature", "inf"], ["--temperature", "inf"]),
    (["generate", "--top-p", "0"], ["--top-p", "0.0"]),
    (["generate", "--top-p", "1.5"], ["--top-p", "1.5"]),
    (["generate", "--top-p", "-0.1"], ["--top-p", "-0.1"]),
    (["generate", "--prefill-chunk", "-1"], ["--prefill-chunk", "-1"]),
    (["generate", "--speculative", "--temperature", "0.7"], ["--temperature", "0.7", "greedy"]),
    (["inspect", "--batch", "0"], ["--batch", "0"]),
    (["inspect", "--seq-len", "-4"], ["--seq-len", "-4"]),
    (["plan", "--devices", "0"], ["--devices", "0"]),
    (["train", "--cpu-devices", "0"], ["--cpu-devices", "0"]),
    (["train", "--num-processes", "0"], ["--num-processes", "0"]),
    (["train", "--num-processes", "2", "--process-id", "2"], ["--process-id", "2"]),
    (["train", "--process-id", "-1"], ["--process-id", "-1"]),
    (["convert", "export", "a", "b", "--max-shard-gb", "0"], ["--max-shard-gb", "0.0"]),
    (["convert", "export", "a", "b", "--max-shard-gb", "inf"], ["--max-shard-gb", "inf"]),
])
def test_flag_out_of_range(capsys, argv, names):
    rc, err = run_cli(capsys, *argv)
    assert rc == 2
    assert_one_line(err, *names)


@pytest.mark.parametrize("argv, flag, users", [
    (["train", "--prompt", "x"], "--prompt", "generate"),
    (["eval", "--temperature", "0.5"], "--temperature", "generate"),
    (["plan", "--prompt", "x"], "--prompt", "generate"),
    (["train", "--image", "a.png"], "--image", "generate"),
    (["eval", "--seed", "0"], "--seed", "generate"),
    (["generate", "--batch", "4"], "--batch", "inspect"),
    (["train", "--devices", "2"], "--devices", "plan"),
    (["inspect", "--lower-only"], "--lower-only", "plan"),
    (["train", "--checkpoint", "x"], "--checkpoint", "eval and generate"),
    (["plot", "--mesh", "m.yaml"], "--mesh", "train"),
    (["train", "--quant", "fp8"], "--quant", "convert export"),
    (["convert", "import", "a", "b", "--layout", "hf"], "--layout", "convert export"),
])
def test_flag_the_command_does_not_read(capsys, argv, flag, users):
    rc, err = run_cli(capsys, *argv)
    assert rc == 2
    assert_one_line(err, f"{flag} is only used by {users}", f"not {argv[0]}")


@pytest.mark.parametrize("argv", [["convert"], ["convert", "import", "a"], ["convert", "move", "a", "b"]])
def test_convert_usage(capsys, argv):
    rc, err = run_cli(capsys, *argv)
    assert rc == 2
    assert_one_line(err, "convert takes `import SRC OUT`")


@pytest.fixture
def cfg_file(tmp_path, corpus):
    return write_config(tmp_path, corpus, sample_prompts=["def f("])


@pytest.mark.parametrize("argv, names", [
    (["--prompt", ""], ["--prompt ''", "empty"]),
    (["--prompt", "x", "--max-new-tokens", "64"], ["--max-new-tokens 64", "model.max_seq_len=64"]),
    (["--prompt", "x"], ["--max-new-tokens 64", "model.max_seq_len=64"]),  # the default 64 does not fit either
    (["--prompt", "x", "--speculative"], ["--speculative", "model.dspark"]),
    (["train.sample_prompts=[]"], ["--prompt TEXT"]),
])
def test_generate_arguments_against_the_model(capsys, cfg_file, argv, names):
    new_tokens = [] if "--max-new-tokens" in " ".join(names) else ["--max-new-tokens", "8"]
    rc, err = run_cli(capsys, "generate", str(cfg_file), *argv, *new_tokens)
    assert rc == 2
    assert_one_line(err, *names)
    assert not (cfg_file.parent / "run").exists()  # refused before the checkpoint load


def test_prompt_too_long_for_max_seq_len(capsys, cfg_file, monkeypatch):
    """The prompt's token count is known only with the run's tokenizer: the library's check, before any compile."""
    tokenizer = SimpleNamespace(encode=lambda text: [1] * len(text), eos_id=0, pad_id=0)
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=64, engram=None))
    session = SimpleNamespace(program=SimpleNamespace(model=model), tokenizer=tokenizer)
    monkeypatch.setattr(cli, "_load", lambda cfg, checkpoint: (session, SimpleNamespace(params={}, router={})))
    rc, err = run_cli(capsys, "generate", str(cfg_file), "--prompt", "x" * 60, "--max-new-tokens", "8")
    assert rc == 2
    assert_one_line(err, "60 tokens", "max_new_tokens=8", "model.max_seq_len=64")


def test_plan_mesh_that_does_not_split_the_parameters(capsys):
    """3 expert-axis devices for 16 experts: a one-line ConfigError naming the array, before lowering."""
    rc, err = run_cli(capsys, "plan", str(ROOT / "configs" / "model" / "tiny.yaml"), "--mesh",
                      str(ROOT / "configs" / "mesh" / "fsdp_ep.yaml"), "--devices", "3", "--lower-only",
                      "mesh.shape=[1,1,1,3,1]", "data.global_batch_size=3")
    assert rc == 2
    assert_one_line(err, "(size 16)", "expert=3", "mesh.shape")


def test_sampling_checks_in_the_library():
    with pytest.raises(InputError, match=r"^top_p must be in \(0, 1\].*got 0"):
        check_sampling(8, 1.0, 0.0)
    with pytest.raises(InputError, match="^temperature .* got -1"):
        check_sampling(8, -1.0)
    check_sampling(1, 0.0, 1.0, 0)  # the edges are allowed


def test_tiny_top_p_keeps_the_most_likely_token():
    """top_p -> 0 tends to greedy; it never means "no filtering" (a kept set of none used to keep all)."""
    logits = jax.numpy.log(jax.numpy.asarray([[0.1, 0.6, 0.3]] * 64))
    draws = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=1e-9))
    assert (draws == 1).all()


def test_debug_reraises(capsys):
    with pytest.raises(InputError, match="--top-p"):
        cli.main(["generate", "--top-p", "2", "--debug"])


def test_a_bug_is_exit_1_with_one_line(capsys, monkeypatch):
    def boom(ns):
        raise RuntimeError("unexpected state\nsecond line")

    monkeypatch.setattr(cli, "_dispatch", boom)
    rc, err = run_cli(capsys, "config")
    assert rc == 1
    assert err == ("error: internal error (RuntimeError: unexpected state); rerun with --debug for the "
                   "traceback\n")


def test_ctrl_c_outside_training_is_exit_130(capsys, monkeypatch):
    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    rc, err = run_cli(capsys, "config")
    assert rc == 130 and err == "interrupted\n"


def _tensorstore_failure(path):
    import tensorstore as ts

    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result()


@pytest.mark.parametrize("failure, names", [
    (lambda d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(d / "ckpt"))),
     ["No space left on device", "ckpt"]),
    (lambda d: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", str(d / "cfg.yaml"))),
     ["Permission denied", "cfg.yaml"]),
    (lambda d: yaml.safe_load("a: [1,\nb: 2"), ["not valid YAML"]),
    (lambda d: _tensorstore_failure(d / "missing"), ["NOT_FOUND", "missing"]),
    (lambda d: (_ for _ in ()).throw(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00TiB.")), ["RESOURCE_EXHAUSTED", "1.00TiB"]),
])
def test_expected_library_failures_are_exit_2(capsys, monkeypatch, tmp_path, failure, names):
    monkeypatch.setattr(cli, "_dispatch", lambda ns: failure(tmp_path))
    rc, err = run_cli(capsys, "config")
    assert rc == 2
    assert_one_line(err, *names)
    assert "tensorstore_spec" not in err


def test_malformed_yaml_file_names_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [64,\n  n_layers: 2\n")
    rc, err = run_cli(capsys, "config", str(bad))
    assert rc == 2
    assert_one_line(err, str(bad))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_config_file(capsys, cfg_file):
    cfg_file.chmod(0)
    try:
        rc, err = run_cli(capsys, "config", str(cfg_file))
    finally:
        cfg_file.chmod(0o644)
    assert rc == 2
    assert_one_line(err, str(cfg_file))


def test_run_dir_inside_a_file(capsys, cfg_file):
    blocker = cfg_file.parent / "a_file"
    blocker.write_text("")
    rc, err = run_cli(capsys, "train", str(cfg_file), f"train.run_dir={blocker / 'run'}")
    assert rc == 2
    assert_one_line(err, str(blocker))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_run_dir_in_a_read_only_directory(capsys, cfg_file):
    locked = cfg_file.parent / "locked"
    locked.mkdir(mode=0o555)
    rc, err = run_cli(capsys, "train", str(cfg_file), f"train.run_dir={locked / 'run'}")
    assert rc == 2
    assert_one_line(err, str(locked))


def test_plot_without_a_run(capsys, tmp_path):
    rc, err = run_cli(capsys, "plot", str(tmp_path / "nothing"))
    assert rc == 2
    assert_one_line(err, str(tmp_path / "nothing"), "does not exist")
    rc, err = run_cli(capsys, "plot", str(tmp_path))
    assert rc == 2
    assert_one_line(err, str(tmp_path / "metrics.jsonl"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    rc, err = run_cli(capsys, "plot", str(tmp_path))
    assert rc == 2
    assert_one_line(err, "metrics.jsonl:2")


def test_tilde_in_path_arguments(capsys, monkeypatch, tmp_path, cfg_file):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mesh.yaml").write_text("mesh:\n  shape: [1, 1, 1, 1, 1]\n")
    assert cli.main(["config", f"~/{cfg_file.relative_to(tmp_path)}", "--mesh", "~/mesh.yaml"]) == 0
    assert "seq_len: 32" in capsys.readouterr().out
    rc, err = run_cli(capsys, "eval", "--checkpoint", "~/converted")
    assert rc == 2 and str(tmp_path / "converted" / "config.yaml") in err
    rc, err = run_cli(capsys, "generate", TRAIN_MM, "--prompt", "x", "--image", "~/a.png")  # takes images
    assert rc == 2 and f"--image {tmp_path / 'a.png'}: no such file" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 5.0 - s}) + "\n"
                                               for s in (1, 2, 3)))
    assert cli.main(["plot", "~/run"]) == 0
    assert (run / "loss.png").is_file()


def test_real_process_exit_code():
    proc = subprocess.run([sys.executable, "-m", "deepseek_jax", "generate", "--top-p", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --top-p") and "Traceback" not in proc.stderr
