"""Every benchmark script starts: its --help lists --smoke, and its smallest run (--smoke) succeeds.

Scripts are found by glob, so a new one is covered as it lands (the convention: CONTRIBUTING.md,
"Benchmarks"). A file of benchmarks/ without a __main__ block is a helper the scripts import.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FILES = sorted(BENCHMARKS.glob("*.py"))
SCRIPTS = [f for f in FILES if re.search(r'^if __name__ == "__main__":', f.read_text(), re.M)]
HELPERS = [f for f in FILES if f not in SCRIPTS]


def test_the_glob_finds_the_scripts():
    assert {"train_step.py", "kernel_timings.py", "serve_throughput.py"} <= {f.name for f in SCRIPTS}


@pytest.mark.parametrize("path", FILES, ids=lambda f: f.name)
def test_no_benchmark_file_hides_an_installed_module(path):
    """A script's folder comes first on sys.path: benchmarks/kernels.py once hid the `kernels` package
    that transformers imports, and every benchmark that loads BERT stopped with an ImportError."""
    spec = importlib.util.find_spec(path.stem)
    assert spec is None or Path(spec.origin).parent == BENCHMARKS, f"{path.name} hides {spec.origin}"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired as exc:  # this script's test fails, the others still run
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return subprocess.CompletedProcess(args, -9, out, f"killed after {exc.timeout:.0f} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """--help and --smoke of every script, and the import of every helper, two processes at a time."""
    work = tmp_path_factory.mktemp("benchmarks")  # their working directory: nothing lands in the checkout
    jobs = {(f.name, "help"): [str(f), "--help"] for f in SCRIPTS}
    jobs |= {(f.name, "smoke"): [str(f), "--smoke"] for f in SCRIPTS}
    jobs |= {(f.name, "import"): ["-c", f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import {f.stem}"]
             for f in HELPERS}
    with ThreadPoolExecutor(2) as pool:
        done = {key: pool.submit(_run, args, work) for key, args in jobs.items()}
        return {key: future.result() for key, future in done.items()}


def _ok(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda f: f.name)
def test_every_script_documents_and_passes_its_smoke_run(runs, script):
    shown = runs[script.name, "help"]
    assert _ok(shown) and "--smoke" in shown.stdout, f"{script.name} --help must list --smoke:\n{shown.stderr[-2000:]}"
    smoke = runs[script.name, "smoke"]
    assert _ok(smoke), (f"{script.name} --smoke exited {smoke.returncode}:\n{smoke.stdout[-1500:]}\n"
                        f"{smoke.stderr[-2500:]}")
    assert smoke.stdout.strip(), f"{script.name} --smoke printed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("helper", HELPERS, ids=lambda f: f.name)
def test_every_helper_module_imports(runs, helper):
    proc = runs[helper.name, "import"]
    assert _ok(proc), proc.stderr[-2000:]
