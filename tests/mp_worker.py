"""Restores a run's latest checkpoint in this process's layout and prints one JSON line ("RESULT {...}").

Run by tests/test_multiprocess.py as `python tests/mp_worker.py CONFIG... key=value...` (one process,
the device count from JAX_NUM_CPU_DEVICES). Reports the step, the data-iterator state this layout got
back, the checkpoint's data files, the largest difference between the restored state (resharded onto
this mesh) and the saved arrays read back without any sharding, and the `eval` command's metrics.
"""

import json
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.config import load_config
from deepseek_jax.run import evaluate, load_trained


def main(args: list[str]) -> None:
    cfg = load_config([a for a in args if "=" not in a], [a for a in args if "=" in a])
    s, state = load_trained(cfg)  # what `deepseek-jax eval` restores
    ckpt = Checkpointer(s.run_dir, use_async=False)
    step = ckpt.latest_step()
    _, data_state, _ = ckpt.restore(step, s.program.state_target())
    as_numpy = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), s.program.abstract_state)
    saved = ocp.StandardCheckpointer().restore(ckpt.directory / str(step) / "state", as_numpy)
    ckpt.close()
    diffs = jax.tree.map(lambda got, want: float(np.max(np.abs(np.asarray(got) - want), initial=0.0)),
                         state, saved)
    devices = {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
    report = {
        "step": step, "int_step": int(state.step), "data_state": data_state, "data_files": ckpt.data_files(step),
        "max_abs_diff": max(jax.tree.leaves(diffs)), "n_leaves": len(jax.tree.leaves(diffs)),
        "param_devices": sorted(devices), "eval": evaluate(s, state),
    }
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
