"""Orbax checkpoints of a run: the train state, the data iterator's state and the resolved config.

Layout: `RUN_DIR/checkpoints/<step>/{state, data, config}`. Orbax writes each step to a temporary
directory and renames it when complete, so a process killed mid-save leaves no directory that
`latest_step` returns; leftovers are cleaned at the next start. The state is restored into an
abstract target whose leaves carry the *new* run's shardings, so a run resumes under another mesh.
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


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, use_async: bool = True):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, cleanup_tmp_directories=True, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts a (possibly asynchronous) save; `wait` blocks until it is on disk."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state placed as `abstract_state`'s shardings say, data-iterator state, config dict)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out.state, out.data, out.config

    def stored_config(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(stored: dict, cfg, run_dir: str | Path) -> None:
    """A run directory may only be resumed by a config with the same model and data stream."""
    new = to_dict(cfg)
    diffs = []
    for section in FROZEN_SECTIONS:
        diffs += _diff(stored.get(section, {}), new[section], section)
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


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a state shaped like `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
