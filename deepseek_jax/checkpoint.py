"""Orbax checkpoints of a run: the train state, the data iterator's state and the resolved config.

Layout: `RUN_DIR/checkpoints/<step>/{state, data, config}`. Orbax writes each step to a temporary
directory and renames it when complete, so a process killed mid-save leaves no directory that
`latest_step` returns; leftovers are cleaned at the next start. The state is restored into an
abstract target whose leaves carry the *new* run's shardings, so a run resumes under another mesh
or another number of processes.

Multi-process: every process calls `save` and `restore` (they are collective); `RUN_DIR` must be
storage all processes see. The state's shards are written by the processes that hold them, the
config once (process 0), and the data-iterator state, which is per process, by each process to its
own file `data/process_<i>-of-<n>.json`. A process restores only the file of its own index and
process count: under another process layout `restore` returns no data state (the caller restarts
the data stream and says so; `data_files` lists what the checkpoint holds).
"""

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from deepseek_jax.config import ConfigError, to_dict

# Sections a resumed run must share with the checkpoint (the rest may change between runs).
FROZEN_SECTIONS = ("model",)
FROZEN_DATA_KEYS = ("source", "format", "jsonl_field", "val_fraction", "tokenizer", "tokenizer_vocab_size",
                    "seq_len", "global_batch_size", "seed", "max_documents")


class CheckpointError(ValueError):
    """A checkpoint does not hold what the model needs; the message names the tensors."""


def data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, use_async: bool = True):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        self.data_file = data_file(jax.process_index(), jax.process_count())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, cleanup_tmp_directories=True, create=True
        )
        every_process = ocp.options.MultiprocessingOptions(primary_host=None)  # each writes its own file
        handlers = {
            "state": ocp.handlers.StandardCheckpointHandler(),
            "data": ocp.handlers.JsonCheckpointHandler(self.data_file, multiprocessing_options=every_process),
            "config": ocp.handlers.JsonCheckpointHandler(),  # process 0 only
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts a (possibly asynchronous) save; `wait` blocks until it is on disk.

        `data_state` is this process's iterator state; the other arguments are the same everywhere."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict]:
        """(state placed as `abstract_state`'s shardings say, this process's data-iterator state, config).

        The data state is None when the checkpoint holds none for this process index and count."""
        has_data = (self._step_dir(step) / "data" / self.data_file).is_file()
        args = {"state": ocp.args.StandardRestore(abstract_state), "config": ocp.args.JsonRestore()}
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except ValueError as e:  # Orbax's structure errors name one key; say what differs, and where
            mismatch = self._mismatch(step, abstract_state)
            if mismatch is None:
                raise
            raise CheckpointError(mismatch) from e
        return out.state, out.data if has_data else None, out.config

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """What the stored state lacks, holds in excess or shapes differently from the target."""
        diff = _tree_diff(_leaf_shapes(self.manager.item_metadata(step)["state"]), _leaf_shapes(abstract_state))
        if diff is None:
            return None
        return (f"checkpoint step {step} in {self.directory} does not fit this model's state: {diff}. "
                "Resume it with the model config and code that wrote it (parameter paths of V3 / V3.2 runs "
                "saved before the scan segments were named layers_a_b/block_k differ), or use a new train.run_dir")

    def data_files(self, step: int) -> list[str]:
        """The per-process data-state files of a step, e.g. ["process_0-of-2.json", "process_1-of-2.json"]."""
        return sorted(p.name for p in (self._step_dir(step) / "data").glob("process_*-of-*.json"))

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)  # CheckpointManager's default step naming

    def stored_config(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# compute-only keys a resumed run may change: the same parameters, the same math
RESUMABLE_CHANGES = ("model.remat:",)


def check_compatible(stored: dict, cfg, run_dir: str | Path) -> None:
    """A run directory may only be resumed by a config with the same model and data stream."""
    new = to_dict(cfg)
    diffs = []
    for section in FROZEN_SECTIONS:
        diffs += [d for d in _diff(stored.get(section, {}), new[section], section)
                  if not d.startswith(RESUMABLE_CHANGES)]
    for key in FROZEN_DATA_KEYS:
        if stored.get("data", {}).get(key) != new["data"][key]:
            diffs.append(f"data.{key}: {stored.get('data', {}).get(key)!r} -> {new['data'][key]!r}")
    if diffs:
        raise ConfigError(
            f"run directory {run_dir} was written by an incompatible config ({'; '.join(diffs[:6])}); "
            "use a new train.run_dir or the original config"
        )


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _tree_diff(have: dict, want: dict) -> str | None:
    """'missing [...] (n), unexpected [...] (n), shapes [...]' between stored and model leaf shapes; None if equal."""
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k} {have[k]} (stored) vs {want[k]} (model)" for k in sorted(set(have) & set(want))
              if have[k] != want[k]]
    if not (missing or extra or shapes):
        return None
    return (f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)}), "
            f"shapes {shapes[:5]}")


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """'params/layers_1_3/block_0/attn/w_uk' -> shape, for every array leaf of a state or its metadata."""
    def name(key) -> str:
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_converted(directory: str | Path, state_target: Any) -> dict:
    """{"params", "router"} of a converted checkpoint (`deepseek-jax convert import` OUT), placed as
    the train state target's shardings say; an error naming the arrays when it does not fit."""
    from deepseek_jax.convert.orbax_writer import restore_tree, stored_shapes

    directory = Path(directory).expanduser().absolute()
    params_dir = directory / "params"
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory} is not a converted checkpoint (no params/ inside; make one with "
                              "`deepseek-jax convert import SRC OUT`)")
    target = {"params": state_target.params, "router": state_target.router}
    diff = _tree_diff({k: tuple(v[0]) for k, v in stored_shapes(params_dir).items()}, _leaf_shapes(target))
    if diff is not None:
        raise CheckpointError(f"converted checkpoint {directory} does not fit this model: {diff}. Use the model "
                              f"section of {directory / 'config.yaml'}")
    return restore_tree(params_dir, target)
