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

Faults. `save` refuses a state holding a NaN or an infinity (naming the leaf), so every checkpoint is
finite. `restore_latest` restores the newest step that restores: a step whose files are missing, truncated
or corrupt is reported on stderr, naming the file, and skipped, and a writer moves it to
`RUN_DIR/damaged_checkpoints/<step>` (nothing is deleted, and a later save of that step number cannot
collide) once an older step has restored; with none intact it is a CheckpointError listing them, never a
fresh start. Damage is looked for before Orbax reads the step (`checkpoint_damage.precheck`: missing files,
malformed JSON, OCDBT manifest and b-tree nodes that fail their checksums, array files shorter than their
values), by every process, which agree before any restore (Orbax's ends in a barrier). With one process,
damage Orbax meets beyond that (its error names the file) falls back too; with several it is a
CheckpointError, since the others may wait in the barrier. Nothing checksums the arrays' bytes: a data file
garbled in place (same size) may restore with wrong values.
Readers (`read_only`: eval, generate) create, clean up and move nothing, so they never touch the
temporary folder of a save in flight.
"""

import functools
import gc
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from deepseek_jax.checkpoint_damage import damage_in, drop_aborted_read_noise, precheck
from deepseek_jax.config import ConfigError, to_dict
from deepseek_jax.multihost import any_process, in_lockstep, sync

# Sections a resumed run must share with the checkpoint (the rest may change between runs).
FROZEN_SECTIONS = ("model",)
FROZEN_DATA_KEYS = ("source", "format", "jsonl_field", "val_fraction", "tokenizer", "tokenizer_vocab_size",
                    "seq_len", "global_batch_size", "seed", "max_documents")
FROZEN_PATH_KEYS = ("source", "tokenizer")  # of FROZEN_DATA_KEYS: file names, compared with `~` expanded
# optimizer keys that shape the optimizer state (optim.py: AdamW's state tree differs from Muon + AdamW's)
FROZEN_OPTIM_KEYS = ("name",)
DAMAGED = "damaged_checkpoints"  # RUN_DIR/<this>/<step>: steps that could not be restored, moved aside
DIVERGED = "diverged_checkpoints"  # RUN_DIR/<this>/<step>: finite states whose forward pass overflowed
STATE_GROUPS = {"params": "parameters", "router": "router biases", "opt_state": "optimizer state"}


class CheckpointError(ValueError):
    """A checkpoint does not hold what the model needs; the message names the tensors."""


def data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


class Checkpointer:
    """The checkpoints of one run directory. `read_only` (eval, generate): no directory is created, no
    temporary folder cleaned up, nothing saved, deleted or moved. (Orbax's own read_only option is not used:
    it warns twice on every open; with create, cleanup and max_to_keep off, and no save, it writes nothing.)"""

    def __init__(self, run_dir: str | Path, keep: int = 3, use_async: bool = True, read_only: bool = False):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        self.read_only = read_only
        self.data_file = data_file(jax.process_index(), jax.process_count())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, enable_async_checkpointing=use_async,
            cleanup_tmp_directories=not read_only, create=not read_only,
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

        `data_state` is this process's iterator state; the other arguments are the same everywhere.
        A state with a non-finite floating-point leaf is refused (CheckpointError naming it)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} is open read-only (eval, generate): step {step} is not saved")
        bad = nonfinite_leaf(state)
        if bad is not None:
            raise CheckpointError(f"refusing to save step {step} to {self.directory}: {bad} holds non-finite "
                                  "values (a checkpoint must be a state training can go on from)")
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
        have, want = _leaf_shapes(self.manager.item_metadata(step)["state"]), _leaf_shapes(abstract_state)
        diff = _tree_diff(have, want)
        if diff is None:
            return None
        keys = set(have) ^ set(want) | {k for k in set(have) & set(want) if have[k] != want[k]}
        groups = sorted({STATE_GROUPS.get(k.split("/")[0], k.split("/")[0]) for k in keys})
        return (f"checkpoint step {step} in {self.directory} does not fit this model's state (it differs in its "
                f"{' and '.join(groups)}): {diff}. Resume it with the model and optimizer config and code "
                "that wrote it (parameter paths of V3 / V3.2 runs saved before the scan segments were named "
                "layers_a_b/block_k differ), or use a new train.run_dir")

    def restore_latest(self, abstract_state: Any, check_config=None) -> tuple[int, Any, dict | None, dict] | None:
        """(step, state, data state, config) of the newest step that restores (module docstring: damaged
        newer steps are skipped with a warning and, by a writer, moved aside); None when there is no step.

        `check_config(stored config)` runs before each step's state is read (its errors propagate)."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            why = precheck(self._step_dir(step))  # before Orbax, whose restore ends in a barrier
            if any_process(why is not None):  # every process checks (the files may differ): all fall back together
                why = why or "a file damaged on another process"
            else:
                out, why = self._restore_step(step, abstract_state, check_config)
            if why is not None:
                damaged.append((step, why))
                if jax.process_index() == 0:
                    print(f"warning: checkpoint step {step} cannot be restored ({why}); trying the step before",
                          file=sys.stderr)
                continue
            if damaged and not self.read_only:
                moved = [self.move_aside(bad, DAMAGED) for bad, _ in damaged]
                if jax.process_index() == 0:
                    print(f"warning: resuming from step {step}; moved the damaged "
                          f"{', '.join(str(m) for m in moved)} aside", file=sys.stderr)
            return (step, *out)
        if damaged:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: "
                                  + "; ".join(f"step {step}: {why}" for step, why in damaged))
        return None

    def _restore_step(self, step: int, abstract_state: Any, check_config) -> tuple[tuple | None, str | None]:
        """(restore's result, None), or (None, "FILE: why") when Orbax finds a file of the step damaged that
        precheck passed. With several processes that is a CheckpointError instead: the other processes may
        be waiting in Orbax's barrier, so they cannot agree on a fall back."""
        step_dir = self._step_dir(step)
        drop_aborted_read_noise()
        try:
            if check_config is not None:
                check_config(self.stored_config(step))
            return self.restore(step, abstract_state), None
        except (CheckpointError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 (only an unreadable file of the step falls back; the rest re-raise)
            why = damage_in(e, step_dir)
            if why is None:
                raise
            if jax.process_count() > 1:
                raise CheckpointError(f"checkpoint step {step} cannot be restored ({why}); with several processes "
                                      f"only damage found before reading falls back: move {step_dir} aside "
                                      "to resume from the step before") from None
            gc.collect()  # the failed reads' coroutines go now (quietly), not at some later step
            return None, why

    def move_aside(self, step: int, folder: str) -> Path:
        """Moves checkpoints/<step> to RUN_DIR/<folder>/<step> (<step>.1, ... if taken): kept, out of the
        way of resumes and of later saves of that step. Process 0 moves; every process returns the path."""
        root = self.directory.parent / folder
        dest, n = root / str(step), 0
        while dest.exists():
            n += 1
            dest = root / f"{step}.{n}"
        sync(f"move_aside {step}")  # every process has picked the name before process 0 moves
        if jax.process_index() == 0:
            root.mkdir(exist_ok=True)
            os.replace(self._step_dir(step), dest)
        sync(f"moved {step}")
        self.manager.reload()
        return dest

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
        old = stored.get("data", {}).get(key)
        if _expanded(key, old) != _expanded(key, new["data"][key]):
            diffs.append(f"data.{key}: {old!r} -> {new['data'][key]!r}")
    for key in FROZEN_OPTIM_KEYS:  # a run directory from before the key was saved is not checked
        old = stored.get("optim", {}).get(key, new["optim"][key])
        if old != new["optim"][key]:
            diffs.append(f"optimizer optim.{key}: {old!r} -> {new['optim'][key]!r} (its state has another layout)")
    if diffs:
        raise ConfigError(
            f"run directory {run_dir} was written by an incompatible config ({'; '.join(diffs[:6])}); "
            "use a new train.run_dir or the original config"
        )


def _expanded(key: str, value: Any) -> Any:
    """A data key's value as check_compatible compares it: file names with `~` expanded, so a run directory
    whose stored config says "~/corpus" (written before the config expanded `~`) resumes with "/home/u/corpus"."""
    return os.path.expanduser(value) if key in FROZEN_PATH_KEYS and isinstance(value, str) else value


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


def _path_name(path) -> str:
    """A tree path as 'params/layers_1_3/block_0/attn/w_uk'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """'params/layers_1_3/block_0/attn/w_uk' -> shape, for every array leaf of a state or its metadata."""
    return {_path_name(path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nonfinite_leaf(tree) -> str | None:
    """The path of the first floating-point leaf of `tree` holding a NaN or an infinity ("params/embedding"),
    or None. One jitted reduction per leaf; collective (every process calls it) when the leaves are global."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return None
    first = int(_first_nonfinite()([x for _, x in leaves]).addressable_shards[0].data)  # a scalar: replicated
    return None if first < 0 else _path_name(leaves[first][0])


def _first_nonfinite_index(leaves: list) -> jax.Array:
    """The index of the first leaf holding a NaN or an infinity, or -1 (int32 scalar)."""
    finite = jnp.stack([jnp.isfinite(x).all() for x in leaves])
    return jnp.where(finite.all(), -1, jnp.argmin(finite)).astype(jnp.int32)


@functools.cache
def _first_nonfinite():
    """_first_nonfinite_index jitted, in lockstep; built at first use, since in_lockstep asks JAX for the process
    count, which would start JAX's backend when this module is imported (before the CLI can configure it)."""
    return in_lockstep(jax.jit(_first_nonfinite_index))


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
