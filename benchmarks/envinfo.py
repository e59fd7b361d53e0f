"""The machine header printed above every benchmark table: what hardware and software the numbers came from.

A number without its machine is not a result. This collects the CPU model, the cores the process may use and the
threads the runtimes were told to use, the ISA extensions that decide CPU inference speed (AVX2, AVX-512, VNNI, AMX),
the GPU when there is one, and the versions of ONNX Runtime, torch, TensorRT and CUDA. Optional packages that are
missing are reported as "not installed" rather than failing: torch and TensorRT are optional here.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

NOT_INSTALLED = "not installed"
#: /proc/cpuinfo flag → the name people know it by. Order is the order printed.
ISA_FLAGS: tuple[tuple[str, str], ...] = (
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("avx512f", "AVX-512F"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("avx512_fp16", "AVX-512 FP16"),
    ("amx_tile", "AMX-TILE"),
    ("amx_int8", "AMX-INT8"),
    ("amx_bf16", "AMX-BF16"),
    ("asimd", "NEON"),  # aarch64 (Jetson)
    ("asimddp", "NEON dot-product"),
)


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, set of flags) from /proc/cpuinfo; falls back to platform.processor() elsewhere."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine() or "unknown", flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):  # x86 "flags", aarch64 "Features"
            flags = set(value.split())
    return model or platform.processor() or platform.machine() or "unknown", flags


def _version(dist: str, module: str | None = None) -> str:
    """Installed version of a distribution, or NOT_INSTALLED; never imports heavy modules just to ask."""
    for name in (dist, module) if module else (dist,):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module:
        try:
            return str(getattr(importlib.import_module(module), "__version__", "unknown"))
        except Exception:  # noqa: BLE001 — any import failure means "not usable here"
            pass
    return NOT_INSTALLED


def cores_available() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _gpu_info() -> dict[str, Any]:
    """GPU name and CUDA versions, via torch if it is importable, else nvidia-smi. Empty names when there is none."""
    info: dict[str, Any] = {"gpu": None, "cuda_runtime": None, "cuda_driver": None}
    try:
        import torch

        info["cuda_runtime"] = torch.version.cuda  # the CUDA torch was built against
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 — torch missing or broken CUDA: fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            if out:
                name, _, driver = out.splitlines()[0].partition(",")
                info["gpu"] = info["gpu"] or name.strip()
                info["cuda_driver"] = driver.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Everything the header shows, as a JSON-ready dict. ``threads``: intra-op threads the benchmark uses."""
    model, flags = _cpuinfo()
    isa = [label for flag, label in ISA_FLAGS if flag in flags]
    try:
        import onnxruntime as ort

        ort_version, ort_providers = ort.__version__, list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        ort_version, ort_providers = NOT_INSTALLED, []
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": model,
        "cpu_logical": os.cpu_count(),
        "cores_available": cores_available(),
        "threads_used": threads,
        "isa": isa,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "opencv": _version("opencv-python-headless", "cv2"),
        "onnxruntime": ort_version,
        "onnxruntime_providers": ort_providers,
        "torch": _version("torch"),
        "tensorrt": _version("tensorrt", "tensorrt"),
        "cuda_python": _version("cuda-python"),
    }
    info.update(_gpu_info())
    return info


def _or(value: Any, default: str) -> str:
    return str(value) if value else default


def format_header(info: dict[str, Any]) -> str:
    """The machine header as Markdown bullet lines."""
    isa = ", ".join(info.get("isa") or []) or "none of the tracked extensions"
    arm = str(info.get("machine", "")).lower() in ("aarch64", "arm64")
    tracked = [label for _, label in ISA_FLAGS
               if label not in (info.get("isa") or []) and label.startswith("NEON") == arm]
    lines = [
        f"- date: {info['date']}",
        f"- CPU: {info['cpu']} ({info['machine']}, {info['os']}); {info['cores_available']} of "
        f"{info['cpu_logical']} logical CPUs available, {_or(info.get('threads_used'), 'default')} threads used",
        f"- ISA: {isa}" + (f" (absent: {', '.join(tracked)})" if tracked else ""),
        f"- GPU: {_or(info.get('gpu'), 'none')}; CUDA (torch build): {_or(info.get('cuda_runtime'), 'n/a')}; "
        f"driver: {_or(info.get('cuda_driver'), 'n/a')}",
        f"- onnxruntime {info['onnxruntime']} (providers: {', '.join(info['onnxruntime_providers']) or 'none'}); "
        f"torch {info['torch']}; TensorRT {info['tensorrt']}; cuda-python {info['cuda_python']}",
        f"- python {info['python']}; numpy {info['numpy']}; opencv {info['opencv']}",
    ]
    return "\n".join(lines)


def isa_summary(info: dict[str, Any]) -> str:
    """One short line for table captions, e.g. ``AVX2, AVX-512F, AVX-512 VNNI``."""
    keep = {"AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-VNNI", "AMX-INT8", "NEON dot-product"}
    return ", ".join(x for x in info.get("isa") or [] if x in keep) or "-"


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A filename-safe version of ``text`` (for result file names)."""
    return _SAFE.sub("-", text).strip("-") or "x"


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m benchmarks.envinfo",
                            description="Print the machine header benchmark tables carry (CPU, ISA, GPU, versions)."
                            ).parse_args(argv)
    print(format_header(machine_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
