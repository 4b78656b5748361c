"""Runs the parity, decode and parameter-count tests; writes what they measure to a Markdown file.

The tests print their measured numbers (max |Δlogit| against HF transformers, KL, top-k margins,
decode-vs-forward errors, parameter counts) and assert the tolerances docs/correctness.md lists.
This script runs them in a pytest subprocess, collects each test's printed lines (pytest's JUnit
XML with captured stdout: the same lines `pytest -s` shows, kept per test) and writes
experiments/results/correctness.md with the machine, package versions, date and commit.

    python experiments/correctness_report.py [--select EXPR] [--out PATH] [-- extra pytest args]

Exit status: pytest's (the file is written either way; failed tests are listed first).
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "correctness.md"
SELECT = " or ".join(
    [  # pytest -k: test, module or marker names (markers count as keywords)
        "parity",  # every test marked `parity`: HF transformers references (torch on CPU)
        "decod",  # decode / decoding: cached decoding vs the full forward (V3, V3.2, V4, composed)
        "param_count",  # full-size parameter counts from jax.eval_shape
        "test_mhc",  # mHC invariants (Sinkhorn row/column sums, degenerate settings) vs numpy
        "sparse_equals_dense",  # DSA with index_topk >= T vs dense MLA
    ]
)
PYTEST_FLAGS = (  # per-test stdout in the JUnit XML; a broken test file does not stop the rest
    "-q -p no:cacheprovider --continue-on-collection-errors "
    "-o junit_logging=system-out -o junit_log_passing_tests=true"
).split()
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "pytest")
DEVICE_PROBE = (
    "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].platform} "
    "({d[0].device_kind}), default backend {jax.default_backend()}')"
)


def run_tests(select: str, extra: list[str], xml_path: Path) -> tuple[int, float]:
    """pytest -k SELECT, each test's stdout recorded in JUnit XML; (exit code, seconds)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_FLAGS, "-k", select, f"--junitxml={xml_path}"]
    cmd += extra
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = datetime.datetime.now()
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    return rc, (datetime.datetime.now() - t0).total_seconds()


def parse(xml_path: Path) -> dict[str, list[dict]]:
    """{test file: [{name, outcome, seconds, lines, message}]} from pytest's JUnit XML."""
    outcomes = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}
    by_file = defaultdict(list)
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in outcomes.items():
            node = case.find(tag)
            if node is not None:
                outcome, message = name, (node.get("message") or "").split("\n")[0][:200]
        out = case.find("system-out")
        text = out.text if out is not None and out.text else ""
        module, name = case.get("classname") or "", case.get("name")
        if not module:  # a collection error names the module, not a test
            module, name = name, "(collection)"
        by_file[module.replace(".", "/") + ".py"].append(
            {
                "name": name,
                "outcome": outcome,
                "message": message,
                "seconds": float(case.get("time") or 0),
                "lines": [
                    ln.rstrip()
                    for ln in text.splitlines()
                    if ln.strip() and not ln.startswith("---")
                ],
            }
        )
    return by_file


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # a probe on a GPU must not preallocate its memory
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    probe = subprocess.run(
        [sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True, env=env, check=False
    )
    devices = probe.stdout.strip() or f"(device probe failed: {probe.stderr.strip()[-200:]})"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {ram:.0f} GiB RAM; "
        f"JAX devices: {devices}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def versions() -> str:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{p} {version(p)}" for p in PACKAGES)


def commit() -> str:
    def git(*args):
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" (with uncommitted changes)" if dirty else "")


def render(by_file: dict, select: str, extra: list[str], rc: int, seconds: float) -> str:
    cases = [c for cs in by_file.values() for c in cs]
    counts = defaultdict(int)
    for c in cases:
        counts[c["outcome"]] += 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    command = " ".join(
        [
            "python experiments/correctness_report.py",
            *(["--select", repr(select)] if select != SELECT else []),
            *(["--", *extra] if extra else []),
        ]
    )
    lines = [
        "# Measured correctness",
        "",
        "Written by `experiments/correctness_report.py`; do not edit by hand (rerun it).",
        "What each test checks and the tolerance it asserts:",
        "[docs/correctness.md](../../docs/correctness.md).",
        "",
        f'Command: `{command}` (pytest `-k "{select}"`)',
        "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; commit {commit()}.",
        "",
        f"Machine: {machine()}.",
        "",
        f"Versions: {versions()}.",
        "",
        f"Result: {summary or 'no tests ran'} in {seconds:.0f} s (pytest exit status {rc}).",
    ]
    bad = [(f, c) for f, cs in by_file.items() for c in cs if c["outcome"] in ("FAILED", "ERROR")]
    if bad:
        lines += ["", "## Failures", ""] + [f"- `{f}::{c['name']}`: {c['message']}" for f, c in bad]
    for file in sorted(by_file):
        lines += ["", f"## `{file}`", ""]
        quiet = []
        for c in by_file[file]:
            if not c["lines"] and c["outcome"] == "passed":
                quiet.append(c["name"])
                continue
            why = f": {c['message']}" if c["message"] else ""
            lines.append(f"**{c['name']}**: {c['outcome']} ({c['seconds']:.1f} s){why}")
            if c["lines"]:
                lines += ["", "```", *c["lines"], "```"]
            lines.append("")
        if quiet:
            lines.append("Passed, printing no numbers: " + ", ".join(f"`{n}`" for n in quiet) + ".")
        while lines[-1] == "":
            lines.pop()
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select", default=SELECT, help="pytest -k expression")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        rc, seconds = run_tests(ns.select, ns.pytest_args, xml_path)
        if not xml_path.exists():
            print(
                f"pytest wrote no report (exit status {rc}); {ns.out} left unchanged",
                file=sys.stderr,
            )
            return rc or 1
        by_file = parse(xml_path)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(render(by_file, ns.select, ns.pytest_args, rc, seconds))
    print(f"wrote {ns.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
