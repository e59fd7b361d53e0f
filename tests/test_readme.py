"""README.md cannot rot: its commands are run here, or skipped for a stated reason.

Every fenced shell command (``bash``/``sh`` blocks, ``&&`` chains split into steps, comments and line continuations
handled) must be either in ``RUN`` (run from a temporary working directory holding ``samples/`` and ``models/``, its
exit code and output checked) or in ``SKIP`` (with the reason it is too expensive or needs hardware). A command in
neither, or an entry that is no longer in the README, fails. Fenced ``python`` blocks are executed. Every
``python -m MODULE --flag`` the README names (fenced or inline), and every one in ``benchmarks/RESULTS.md`` and
``docs/*.md``, must have that flag in ``MODULE --help``; the README's record fields and exit-code table
must match what ``runtime.run`` writes and returns; the files it links must exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

INSTALL = "installs packages from a package index (CI's .ci/run does this on a clean clone)"
TRAINS = "trains or exports a model: minutes of CPU (the same steps run in tests/train and tests/export, smaller)"

#: Fenced commands not run here, each with its reason.
SKIP: dict[str, str] = {
    "pip install .": INSTALL,
    "pip install '.[train,dev]'": INSTALL,
    "python -m pytest -q": "the test suite itself",
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu": INSTALL,
    "pip install '.[train]'": INSTALL,
    "python -m train.synthetic --out data/synth --per-class 300 --seed 0": "writes 2400 images: a minute of CPU "
    "(tests/train/test_synthetic.py runs the generator small)",
    "python -m train --data data/synth --out runs/synth": TRAINS,
    "python -m export --checkpoint runs/synth/best.pt": TRAINS,
    "python -m export.build_engine --onnx runs/synth/best.onnx --int8 --calib-data data/synth/train "
    "--val-data data/synth/val": TRAINS,
    "python -m runtime.run --source /dev/video0 --model runs/synth/best.onnx": "needs a camera and a trained model",
    "python -m export.build_engine --onnx model.onnx --int8 --calib-data data/train --val-data data/val":
        "needs the user's model and data, and TensorRT on a GPU for the engine",
    "python -m runtime.doctor --model model.int8.engine": "needs a TensorRT engine built on an NVIDIA GPU",
    "python -m train.audit --data DIR": "needs the user's dataset (DIR); tests/train/test_audit.py runs it",
    "python -m train --data DIR --out runs/NAME": TRAINS,
    "python -m train.evaluate --model runs/NAME/best.pt --data DIR/test --out runs/NAME/eval": TRAINS,
    "python -m export --checkpoint runs/NAME/best.pt": TRAINS,
}

SAMPLES = sorted(p.name for p in (REPO / "samples").glob("*.png"))


def _readme_record_fields() -> list[str]:
    m = re.search(r"Each record: `([^`]+)`", README.read_text(encoding="utf-8"))
    assert m, "README: the runtime.run section no longer lists the record fields as `Each record: `a, b, ...``"
    return [f.strip() for f in m.group(1).split(",")]


def _check_run_samples(r: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert r.returncode == 0, r.stderr
    for name in SAMPLES:  # one line per image on stdout
        assert name in r.stdout, f"{name} missing from the per-image lines:\n{r.stdout}"
    assert "summary" in r.stderr


def _check_run_records(r: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert r.returncode == 0, r.stderr
    lines = (cwd / "res.jsonl").read_text().splitlines()
    assert len(lines) == len(SAMPLES)
    records = [json.loads(line) for line in lines]
    # JSON records add "drift" while the drift alarm runs (the bundled model carries its statistics); CSV does not.
    assert all([k for k in rec if k != "drift"] == _readme_record_fields() for rec in records), records[0]
    assert "`drift`" in README.read_text(encoding="utf-8") or not any("drift" in rec for rec in records)
    header = (cwd / "res.csv").read_text().splitlines()[0]
    assert header.split(",") == _readme_record_fields()
    # "Record files are appended to, never truncated": the same command again doubles them.
    again = subprocess.run(r.args, cwd=cwd, capture_output=True, text=True, timeout=120, env=_env())
    assert again.returncode == 0, again.stderr
    assert len((cwd / "res.jsonl").read_text().splitlines()) == 2 * len(SAMPLES)
    assert len((cwd / "res.csv").read_text().splitlines()) == 1 + 2 * len(SAMPLES)


def _check_pass(r: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout + r.stderr


def _check_doctor(r: subprocess.CompletedProcess[str], cwd: Path) -> None:
    # 0 ready, 1 a check failed, 3 no NVIDIA GPU here (what CI machines have): never a traceback.
    assert r.returncode in (0, 1, 3), r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr


#: Fenced commands run here, each with what its result must show.
RUN: dict[str, Callable[[subprocess.CompletedProcess[str], Path], None]] = {
    "python -m runtime.run --source samples/": _check_run_samples,
    "python -m runtime.run --source samples/ --output res.jsonl --output res.csv --quiet": _check_run_records,
    "python -m runtime.check --model models/sem_classifier.int8.onnx": _check_pass,
    "python -m runtime.doctor": _check_doctor,
}


# ------------------------------------------------------------------------------------------------ parsing
def _strip_comment(line: str) -> str:
    """The line without a shell comment (a ``#`` at a word start, outside quotes)."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_steps(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", body)
    steps = []
    for line in joined.splitlines():
        line = _strip_comment(line)
        steps += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return steps


def readme_steps() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [s for lang, body in fenced_blocks(text) if lang in ("bash", "sh", "shell", "console")
            for s in shell_steps(body)]


def readme_python_blocks() -> list[str]:
    return [body for lang, body in fenced_blocks(README.read_text(encoding="utf-8")) if lang in ("python", "py")]


def module_invocations(text: str) -> list[tuple[str, list[str]]]:
    """``(module, [--flags])`` for every ``python -m MODULE ...`` in the fenced shell commands and inline code."""
    steps = [s for lang, body in fenced_blocks(text) if lang in ("", "bash", "sh", "shell", "console")
             for s in shell_steps(body)]
    spans = steps + re.findall(r"`([^`\n]*python3? -m [^`\n]*)`", text)
    found = []
    for span in spans:
        for m in re.finditer(r"python3? -m ([\w.]+)([^|&]*)", span):
            module, rest = m.group(1), m.group(2)
            if module in ("pytest", "pip", "venv"):
                continue
            found.append((module, re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)))
    return found


# ------------------------------------------------------------------------------------------------ running
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "python", f"RUN holds python commands only: {command}"
    return [sys.executable, *argv[1:]]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A working directory like a user's checkout: ``samples/`` and ``models/`` beside them, nothing else."""
    for name in ("samples", "models"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp_path


@cache
def _help(module: str) -> str:
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=_env())
    assert r.returncode == 0, f"python -m {module} --help failed:\n{r.stderr}"
    return r.stdout


# ------------------------------------------------------------------------------------------------ the tests
def test_every_fenced_command_is_run_or_skipped() -> None:
    steps = readme_steps()
    assert steps, "no fenced shell commands found in README.md"
    unlisted = [s for s in steps if s not in RUN and s not in SKIP]
    assert not unlisted, ("README commands neither run by this test nor skipped with a reason (add them to RUN, or "
                          "to SKIP with why):\n  " + "\n  ".join(unlisted))
    stale = [s for s in (*RUN, *SKIP) if s not in steps]
    assert not stale, "RUN/SKIP entries the README no longer has:\n  " + "\n  ".join(stale)
    assert not set(RUN) & set(SKIP)
    print(f"README: {len(steps)} fenced commands, {sum(s in RUN for s in steps)} run, "
          f"{sum(s in SKIP for s in steps)} skipped; {len(readme_python_blocks())} Python block(s) executed")


@pytest.mark.parametrize("command", [s for s in RUN])
def test_readme_command_runs(command: str, user_dir: Path) -> None:
    r = subprocess.run(_argv(command), cwd=user_dir, capture_output=True, text=True, timeout=300, env=_env())
    RUN[command](r, user_dir)


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(index: int, user_dir: Path) -> None:
    code = readme_python_blocks()[index]
    r = subprocess.run([sys.executable, "-c", code], cwd=user_dir, capture_output=True, text=True, timeout=300,
                       env=_env())
    assert r.returncode == 0, f"README Python block {index} failed:\n{code}\n{r.stderr}"


DOCS_WITH_COMMANDS = ["README.md", "benchmarks/RESULTS.md",
                      *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS)
def test_every_flag_named_exists(doc: str) -> None:
    """The commands in the README, in RESULTS.md and in docs/ use flags the tools have."""
    invocations = module_invocations((REPO / doc).read_text(encoding="utf-8"))
    if doc in ("README.md", "benchmarks/RESULTS.md"):
        assert len({m for m, _ in invocations}) >= 5, invocations
    missing = [f"python -m {module} {flag}" for module, flags in invocations for flag in flags
               if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help(module))]
    assert not missing, f"{doc} names flags the tools do not have (their --help lacks them):\n  " + "\n  ".join(
        sorted(set(missing)))


def test_exit_code_table_matches_runtime_run() -> None:
    from runtime.summary import EXIT_CODES  # the one home of runtime.run's exit codes

    section = README.read_text(encoding="utf-8").split("## `python -m runtime.run`", 1)[1].split("\n## ", 1)[0]
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert codes == set(EXIT_CODES), f"README exit codes {sorted(codes)} vs runtime.run {sorted(EXIT_CODES)}"


def test_readme_links_exist() -> None:
    text = README.read_text(encoding="utf-8")
    targets = set(re.findall(r"\]\(([^)#]+)\)", text)) | set(re.findall(r"`((?:docs|models|benchmarks)/[\w./-]+)`",
                                                                       text))
    missing = [t for t in sorted(targets) if not t.startswith("http") and not (REPO / t).exists()]
    assert not missing, f"README links files that do not exist: {missing}"


def test_shell_parsing() -> None:
    """The extraction itself: continuations, comments (not inside quotes), && chains."""
    body = "pip install . && python -m a --x 1   # note\npython -m b \\\n    --y 'q#r' # c\n# only a comment\n"
    assert shell_steps(body) == ["pip install .", "python -m a --x 1", "python -m b --y 'q#r'"]
