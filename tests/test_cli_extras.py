"""Every command line tool without the ``train`` extra (a ``pip install .`` box): ``--help`` works, a run says in one
line which extra to install, never a traceback; and the tools find the bundled model from an installed layout.

The missing extra is simulated in a subprocess: a ``sitecustomize`` on ``PYTHONPATH`` puts an import blocker for
torch, onnx, scikit-learn, ... first on ``sys.meta_path``, so CI needs no second virtual environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sem_extras
from runtime.classifier import DEFAULT_INT8_MODEL, DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
#: Every module an extra installs, blocked (tensorrt/cuda too: the runtime-only box has none of them).
BLOCKED = tuple(sorted(sem_extras.EXTRA_FOR_MODULE))
TOOL_PACKAGES = ("runtime", "train", "export", "calibration", "benchmarks")

BLOCKER = f'''
import importlib.abc
import sys

_BLOCKED = frozenset({BLOCKED!r})


class _NoTrainExtra(importlib.abc.MetaPathFinder):
    """Acts as if the train and tensorrt extras were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NoTrainExtra())
'''


def command_line_tools() -> list[str]:
    """``python -m`` names of every module of ours with a ``__main__`` block (new tools are checked automatically)."""
    found = []
    for pkg in TOOL_PACKAGES:
        for f in sorted((REPO / pkg).glob("*.py")):
            if 'if __name__ == "__main__"' in f.read_text(encoding="utf-8"):
                found.append(pkg if f.stem == "__main__" else f"{pkg}.{f.stem}")
    return found


TOOLS = command_line_tools()


@pytest.fixture(scope="module")
def no_extra_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("no_train_extra")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}


def run_tool(module: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_blocker_hides_the_extra_and_keeps_the_runtime(no_extra_env: dict[str, str], tmp_path: Path) -> None:
    """Without this, every test below could pass on a machine where the blocker silently did nothing."""
    probe = ("import importlib, sys\n"
             f"for name in {BLOCKED!r}:\n"
             "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n        continue\n"
             "    sys.exit('imported ' + name)\n"
             "from runtime import Classifier\nprint('runtime ok')\n")
    r = subprocess.run([sys.executable, "-c", probe], env=no_extra_env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "runtime ok" in r.stdout, r.stderr


def test_every_tool_package_has_command_line_tools() -> None:
    for name in ("train", "export", "export.build_engine", "calibration", "benchmarks.latency", "runtime.run"):
        assert name in TOOLS


@pytest.mark.parametrize("module", TOOLS)
def test_help_works_without_the_train_extra(module: str, no_extra_env: dict[str, str], tmp_path: Path) -> None:
    r = run_tool(module, ["--help"], no_extra_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert re.search(r"usage: .*" + re.escape(module.split(".")[-1]), r.stdout), r.stdout[:500]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """Files a run needs to get past its argument checks (never read: the missing extra stops it first)."""
    import cv2

    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "clean").mkdir(parents=True)
        cv2.imwrite(str(data / split / "clean" / "a.png"), np.full((32, 32), 128, np.uint8))
    (tmp_path / "m.onnx").write_bytes(b"not read")
    (tmp_path / "m.pt").write_bytes(b"not read")
    return {"data": str(data), "onnx": str(tmp_path / "m.onnx"), "pt": str(tmp_path / "m.pt"), "tmp": str(tmp_path)}


#: A run of each tool that needs the train extra, with arguments that pass its own checks.
RUNS = {
    "export": ["--checkpoint", "{pt}"],
    "export.build_engine": ["--onnx", "{onnx}", "--fp16"],
    "export.golden": ["--model", "{onnx}", "--data", "{data}"],
    "train": ["--data", "{data}", "--out", "{tmp}/run"],
    "train.evaluate": ["--model", "{onnx}", "--data", "{data}/train"],
    "train.audit": ["--data", "{data}"],
    "train.synthetic": ["--out", "{tmp}/synth", "--per-class", "1", "--size", "32"],
    "calibration": ["--onnx", "{onnx}", "--data", "{data}"],
    "benchmarks.latency": ["--backends", "onnxruntime", "--precisions", "fp32", "--batch", "1", "--iters", "1",
                           "--rounds", "1", "--gemm-size", "0", "--no-progress", "--out", "{tmp}/lat"],
    "benchmarks.accuracy": ["--data", "{data}/train", "--no-progress", "--out", "{tmp}/acc"],
    "benchmarks.openset": ["--cost", "--out", "{tmp}/os"],
}


@pytest.mark.parametrize("module", sorted(RUNS))
def test_a_run_without_the_train_extra_names_it_in_one_line(module: str, no_extra_env: dict[str, str],
                                                             inputs: dict[str, str], tmp_path: Path) -> None:
    r = run_tool(module, [a.format(**inputs) for a in RUNS[module]], no_extra_env, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == sem_extras.EXIT_MISSING_EXTRA, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"python -m {module}: needs ") and "pip install '.[train]'" in lines[0], lines[0]
    if module == "train":
        assert not (tmp_path / "run").exists()  # stopped before it wrote anything


def test_the_guard_leaves_other_import_errors_alone() -> None:
    """A missing module of ours (a bug) or a broken installed package is a traceback, not 'install the extra'."""

    @sem_extras.cli("python -m x")
    def ours(argv: list[str] | None = None) -> int:
        import runtime.no_such_module  # noqa: F401

        return 0

    with pytest.raises(ModuleNotFoundError):
        ours([])
    # onnx comes with the train extra, which the tests run with: a missing part of it is a broken install.
    installed = ModuleNotFoundError("No module named 'onnx.no_such_part'", name="onnx.no_such_part")
    assert sem_extras.missing_extra(installed) is None
    absent = ModuleNotFoundError("No module named 'no_such_extra_module'", name="no_such_extra_module.part")
    sem_extras.EXTRA_FOR_MODULE["no_such_extra_module"] = "train"
    try:
        assert sem_extras.missing_extra(absent) == ("no_such_extra_module", "train")
    finally:
        del sem_extras.EXTRA_FOR_MODULE["no_such_extra_module"]


def test_help_stand_in_never_becomes_a_default() -> None:
    """The stand-in shows as ? in --help; argparse must not try to convert it, and a given value still parses."""
    import argparse

    u = sem_extras.Unavailable("torch", "train")
    p = argparse.ArgumentParser(epilog=sem_extras.help_note(u))
    p.add_argument("--epochs", type=int, default=u.TrainConfig().epochs, help="(default %(default)s)")
    p.add_argument("--score", default=u.X, choices=u.ALL_SCORES)
    assert "(default ?)" in p.format_help() and "pip install '.[train]'" in p.format_help()
    assert p.parse_args(["--epochs", "3", "--score", "energy"]).epochs == 3


def _installed_layout(site: Path) -> Path:
    """What ``pip install .`` puts in site-packages: the packages, sem_extras, and models/ as runtime/models/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in TOOL_PACKAGES:
        shutil.copytree(REPO / pkg, site / pkg, ignore=ignore)
    shutil.copy2(REPO / "sem_extras.py", site / "sem_extras.py")
    (site / "runtime" / "models").mkdir()
    for name in (DEFAULT_MODEL, DEFAULT_INT8_MODEL, "__init__.py"):
        if (REPO / "models" / name).is_file():
            shutil.copy2(REPO / "models" / name, site / "runtime" / "models" / name)
    return site


def test_tools_find_the_bundled_model_in_an_installed_layout(tmp_path: Path) -> None:
    """Outside the checkout there is no repository models/ folder: the tools must ask the runtime's resolver."""
    assert (REPO / "models" / DEFAULT_MODEL).is_file(), "the bundled model is part of the repository"
    site = _installed_layout(tmp_path / "site")
    probe = ("from benchmarks import accuracy, latency\n"
             "print(latency.resolve_model(None))\n"
             "for m in accuracy.bundled_models():\n    print(m)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([sys.executable, "-c", probe], env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    found = [Path(line) for line in r.stdout.split()]
    assert found and all(p.is_relative_to(site / "runtime" / "models") for p in found), (found, r.stderr)
    assert found[0].name == DEFAULT_MODEL


def test_the_install_carries_the_guard_and_every_tool_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tool imports sem_extras: a wheel without it would turn each CLI into an ImportError traceback."""
    import runpy

    import setuptools

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    assert "sem_extras" in captured.get("py_modules", [])
    assert set(TOOL_PACKAGES) <= set(captured["packages"]) and "runtime.models" in captured["packages"]


#: What ``pip install .`` installs (setup.py install_requires), by import name.
RUNTIME_DEPENDENCIES = {"numpy", "cv2", "onnxruntime"}


def test_every_third_party_import_of_the_tools_is_mapped_to_its_extra() -> None:
    """A new dependency of train/export/calibration/benchmarks without an entry in EXTRA_FOR_MODULE would make the
    guard pass its ModuleNotFoundError through as a traceback on a runtime-only install."""
    import ast

    ours = {*TOOL_PACKAGES, "sem_extras", "__future__"}
    unmapped: dict[str, str] = {}
    for pkg in TOOL_PACKAGES[1:]:  # the runtime handles its own optional backends
        for f in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.partition(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in ours or top in RUNTIME_DEPENDENCIES:
                        continue
                    if top not in sem_extras.EXTRA_FOR_MODULE:
                        unmapped.setdefault(top, str(f.relative_to(REPO)))
    assert not unmapped, f"add these to sem_extras.EXTRA_FOR_MODULE: {unmapped}"
