"""Shared test set-up.

XLA:CPU compiles are the suite's main cost; a persistent compilation cache lets tests that jit the
same computation (the tiny model's init and forward) share one compile within and across runs.
"""

import gc
import os
import tempfile

# XLA:CPU spends most of a compile in LLVM's optimisation passes; the tests' tiny programs compile ~3x
# faster without them and run about as fast (the HLO passes, SPMD partitioning included, are unchanged).
# Set before JAX initialises its backend; subprocesses the tests start (CLI runs, multi-process workers)
# inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Multi-device tests (`multidevice` marker) run on 8 fake CPU devices; this must happen before any
# backend use. Single-device tests are unaffected: they place everything on device 0.
jax.config.update("jax_num_cpu_devices", 8)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DEEPSEEK_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "deepseek_jax_xla_cache")),
)
# every compile, however short: the suite's many sub-second compiles add up to about 80 s of a warm
# `pytest -m "not slow"` run (215 s -> 134 s on 2 cores, at 438 tests)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops the jit caches' compiled programs after each test module. XLA:CPU maps every compiled program
    into memory; by ~1,000 tests one process holds thousands of them and the next compile crashed (SIGSEGV /
    SIGABRT inside the compilation cache's write, twice at the same point of a full run) — consistent with
    the kernel's 65,530 memory maps per process running out. Recompiles hit the persistent cache above."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few hundred KB of real Python source as text files (the loop tests' data)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, f in enumerate(sorted(stdlib.glob("*.py"))[:60]):
        (root / f"doc{i:03d}.txt").write_text(f.read_text(errors="ignore"))
    return root
