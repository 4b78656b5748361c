"""Planning a run without running it: per-device memory and collective volume of one train step.

`plan(cfg, n)` builds the config's Program over a mesh of n devices (no parameter is allocated:
`eval_shape` and `ShapeDtypeStruct`s only), lowers the jitted, donating train step and, by default,
compiles it. `hlo.py` reads the collectives from the compiled HLO; `analytic.py` gives the state
bytes from the shardings and an estimate of the collectives without a compiler; `report.py` runs
the plan and formats it (`deepseek-jax plan`).
"""

from deepseek_jax.plan.analytic import estimate, sharded_bytes, state_memory
from deepseek_jax.plan.hlo import KINDS, Volume, collectives, shape_bytes
from deepseek_jax.plan.report import (
    CPU_PLAN_COMPILER_OPTIONS,
    PlanError,
    PlanResult,
    format_report,
    memory,
    plan,
    request_cpu_devices,
)

__all__ = [
    "CPU_PLAN_COMPILER_OPTIONS", "KINDS", "PlanError", "PlanResult", "Volume", "collectives", "estimate",
    "format_report", "memory", "plan", "request_cpu_devices", "shape_bytes", "sharded_bytes", "state_memory",
]
