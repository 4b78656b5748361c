"""Shared test set-up.

XLA:CPU compiles are the suite's main cost; a persistent compilation cache lets tests that jit the
same computation (the tiny model's init and forward) share one compile within and across runs.
"""

import os
import tempfile

import jax

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DEEPSEEK_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "deepseek_jax_xla_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
