"""Checkpoints that do not fit the model are refused with the tensors named (not Orbax's first key); a
non-finite state is never saved; a damaged newest step falls back to the one before, naming the file."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import checkpoint
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, check_compatible
from deepseek_jax.config import ConfigError
from tests.utils import ROOT


def test_restore_into_another_parameter_tree_names_the_differences(tmp_path):
    ckpt = Checkpointer(tmp_path, use_async=False)
    state = {"params": {"moe_layers": {"w": jnp.ones((2, 3))}, "e": jnp.zeros(4)}, "step": jnp.int32(7)}
    ckpt.save(7, state, {"position": 1}, {"model": {}})
    ckpt.wait()
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    renamed = {"params": {"layers_1_3": {"block_0": {"w": spec(2, 3)}}, "e": spec(4)},
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(CheckpointError, match=r"missing \['params/layers_1_3/block_0/w'\].*unexpected "
                                              r"\['params/moe_layers/w'\]"):
        ckpt.restore(7, renamed)
    same = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored, data, _ = ckpt.restore(7, same)
    assert int(restored["step"]) == 7 and data == {"position": 1}
    ckpt.close()


def _spec(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def _state(scale: float) -> dict:
    return {"params": {"w": jnp.arange(50_000, dtype=jnp.float32) * scale, "b": jnp.full((30, 40), scale)},
            "opt_state": {"mu": jnp.zeros(1000) + scale}, "step": jnp.int32(scale)}


@pytest.fixture
def two_steps(tmp_path):
    """A run directory with steps 1 and 2 saved (step 2's values are twice step 1's)."""
    ckpt = Checkpointer(tmp_path, use_async=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"position": step}, {"model": {}})
    ckpt.close()
    return tmp_path


def test_save_refuses_a_nonfinite_state(tmp_path):
    ckpt = Checkpointer(tmp_path, use_async=False)
    state = _state(1)
    state["opt_state"]["mu"] = state["opt_state"]["mu"].at[3].set(jnp.inf)
    with pytest.raises(CheckpointError, match=r"refusing to save step 5 .*opt_state/mu holds non-finite"):
        ckpt.save(5, state, {}, {})
    ckpt.close()
    assert ckpt.latest_step() is None and not (tmp_path / "checkpoints" / "5").exists()


def test_mismatch_says_which_part_of_the_state_differs(two_steps):
    ckpt = Checkpointer(two_steps, use_async=False)
    target = _spec(_state(1))
    target["opt_state"] = {"muon": {"mu": target["opt_state"]["mu"]}}  # another optimizer's state tree
    with pytest.raises(CheckpointError, match=r"it differs in its optimizer state\): missing \['opt_state/muon/mu'\]"):
        ckpt.restore(2, target)
    with pytest.raises(CheckpointError, match=r"step 2 .*it differs in its optimizer state"):
        ckpt.restore_latest(target)  # another state is no damage: no fall back to step 1
    ckpt.close()
    assert (two_steps / "checkpoints" / "2").is_dir()


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# (file of step 2 to damage, how); each must be detected, named, and skipped for step 1
DAMAGE = [
    ("state/ocdbt.process_0/d", "truncate"), ("state/ocdbt.process_0/d", "delete"),
    ("state/ocdbt.process_0/d", "empty"),
    ("state/manifest.ocdbt", "truncate"), ("state/manifest.ocdbt", "garble"), ("state/d", "delete"),
    ("state/_METADATA", "garble"), ("config/metadata", "delete"), ("data/process_0-of-1.json", "truncate"),
    ("data/process_0-of-1.json", "delete"),
]


def _damage(step_dir: Path, where: str, how: str) -> Path:
    path = step_dir / where
    path = _largest(path) if path.is_dir() else path
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "garble":  # 16 bytes flipped in the middle, same size
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 16]) + data[mid + 16:])
    else:
        path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    return path


@pytest.mark.parametrize("where, how", DAMAGE, ids=[f"{how}-{where}" for where, how in DAMAGE])
def test_damaged_newest_step_falls_back_to_the_one_before(two_steps, capsys, monkeypatch, where, how):
    """Found before Orbax reads the step (with several processes, a failure inside Orbax's restore would leave
    the others in its barrier): Orbax restores step 1 only."""
    damaged = _damage(two_steps / "checkpoints" / "2", where, how)
    restored, restore = [], Checkpointer.restore
    monkeypatch.setattr(Checkpointer, "restore", lambda self, step, *a: restored.append(step) or restore(self, step,
                                                                                                        *a))
    ckpt = Checkpointer(two_steps, use_async=False)
    step, state, data, _ = ckpt.restore_latest(_spec(_state(1)))
    ckpt.close()
    assert step == 1 and data == {"position": 1} and restored == [1]
    assert np.array_equal(np.asarray(state["params"]["w"]), np.arange(50_000, dtype=np.float32))
    err = capsys.readouterr().err
    named = "checkpoints/2" if how == "delete" else damaged.name  # a deleted file: its step (or item) directory
    assert "checkpoint step 2 cannot be restored" in err and named in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert (two_steps / "damaged_checkpoints" / "2").is_dir()  # moved aside, nothing deleted
    assert not (two_steps / "checkpoints" / "2").exists()


def test_reader_falls_back_without_moving_anything(two_steps, capsys):
    _damage(two_steps / "checkpoints" / "2", "state/ocdbt.process_0/d", "truncate")
    ckpt = Checkpointer(two_steps, use_async=False, read_only=True)
    assert ckpt.restore_latest(_spec(_state(1)))[0] == 1
    ckpt.close()
    assert "checkpoint step 2 cannot be restored" in capsys.readouterr().err
    assert (two_steps / "checkpoints" / "2").is_dir() and not (two_steps / "damaged_checkpoints").exists()


def test_no_intact_step_is_an_error_listing_them(two_steps):
    for step in ("1", "2"):
        _damage(two_steps / "checkpoints" / step, "state/manifest.ocdbt", "truncate")
    ckpt = Checkpointer(two_steps, use_async=False)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored: step 2: .*manifest\.ocdbt.*; "
                                              r"step 1: .*manifest\.ocdbt"):
        ckpt.restore_latest(_spec(_state(1)))
    ckpt.close()
    assert sorted(p.name for p in (two_steps / "checkpoints").iterdir()) == ["1", "2"]  # never a fresh start


def test_garbled_array_bytes_restore_undetected(two_steps):
    """Orbax keeps no checksum of the arrays' bytes: a data file garbled in place (same size) restores with
    wrong values. docs/guarantees.md says so; this test fails the day Orbax starts detecting it."""
    _damage(two_steps / "checkpoints" / "2", "state/ocdbt.process_0/d", "garble")
    ckpt = Checkpointer(two_steps, use_async=False)
    step, state, _, _ = ckpt.restore_latest(_spec(_state(1)))
    ckpt.close()
    assert step == 2 and not np.array_equal(np.asarray(state["params"]["w"]), np.arange(50_000) * 2.0)


def test_reader_creates_and_cleans_up_nothing(two_steps, tmp_path):
    missing = tmp_path / "elsewhere"
    Checkpointer(missing, read_only=True).close()
    assert not missing.exists()
    in_flight = two_steps / "checkpoints" / "3.orbax-checkpoint-tmp-1234"  # a concurrent writer's save
    in_flight.mkdir()
    Checkpointer(two_steps, read_only=True).close()
    assert in_flight.is_dir()
    writer = Checkpointer(two_steps, use_async=False)  # a writer cleans it up (at the latest before its first save)
    writer.save(5, _state(5), {}, {})
    writer.close()
    assert not in_flight.exists()


def test_resume_with_another_optimizer_names_it():
    from deepseek_jax.cli import DEFAULT_CONFIG
    from deepseek_jax.config import load_config, to_dict

    stored = to_dict(load_config([str(DEFAULT_CONFIG)]))
    with pytest.raises(ConfigError, match=r"optimizer optim\.name: 'adamw' -> 'muon'"):
        check_compatible(stored, load_config([str(DEFAULT_CONFIG)], ["optim.name=muon"]), "runs/x")
    check_compatible(stored, load_config([str(DEFAULT_CONFIG)], ["optim.lr=0.1"]), "runs/x")  # lr may change


def test_damage_only_orbax_meets_is_an_error_with_several_processes(two_steps, monkeypatch):
    """Damage the pre-check missed, met inside Orbax's restore: one process falls back; with several it is an
    error naming the step (the others may wait in Orbax's barrier: no agreement on a fall back is possible)."""
    _damage(two_steps / "checkpoints" / "2", "state/ocdbt.process_0/d", "truncate")
    monkeypatch.setattr(checkpoint, "precheck", lambda step_dir: None)
    ckpt = Checkpointer(two_steps, use_async=False, read_only=True)  # moves nothing: step 2 stays for the next
    assert ckpt.restore_latest(_spec(_state(1)))[0] == 1
    monkeypatch.setattr(checkpoint, "any_process", lambda flag: flag)  # no other process to ask
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 cannot be restored \(.*ocdbt\.process_0/d/.*\); "
                                              r"with several processes only damage found before reading"):
        ckpt.restore_latest(_spec(_state(1)))


def test_stored_tilde_paths_match_their_expansion(tmp_path, monkeypatch):
    """A run directory whose stored config says data.source: ~/corpus (saved before `~` was expanded) resumes
    with today's expanded config: the config check and the data iterator's state compare expanded paths."""
    import grain

    from deepseek_jax.cli import DEFAULT_CONFIG
    from deepseek_jax.config import load_config, to_dict
    from deepseek_jax.data import DataError
    from deepseek_jax.data.pipeline import DataIterator

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config([str(DEFAULT_CONFIG)], ["data.source=~/corpus", "data.tokenizer=~/tok.json"])
    assert cfg.data.source == str(tmp_path / "corpus")
    stored = to_dict(cfg)
    stored["data"].update(source="~/corpus", tokenizer="~/tok.json")
    check_compatible(stored, cfg, "runs/x")
    stored["data"]["source"] = "~/other"
    with pytest.raises(ConfigError, match=r"data\.source: '~/other' -> '.*/corpus'"):
        check_compatible(stored, cfg, "runs/x")

    def iterator(source: str) -> DataIterator:
        return DataIterator(grain.MapDataset.range(8).to_iter_dataset(), {"source": source, "seed": 0})

    state = iterator("~/corpus").get_state()
    iterator(str(tmp_path / "corpus")).set_state(state)
    with pytest.raises(DataError, match=r"changed: source '~/corpus' -> '/.*/other'"):
        iterator(str(tmp_path / "other")).set_state(state)


def test_importing_the_package_leaves_jax_unconfigured():
    """Importing run / checkpoint starts no JAX backend, so a caller can still configure JAX (devices, platform)."""
    code = ("import deepseek_jax.cli, deepseek_jax.run, jax\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, xla_bridge._backends\n"
            "jax.config.update('jax_num_cpu_devices', 2)\n"
            "assert len(jax.devices()) == 2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
