"""The TensorRT engine build used by ``python -m export.build_engine``: see :mod:`runtime.trt_build`.

The builder calls live in the runtime package because an engine is built on the machine that runs it, and
``python -m runtime.doctor`` builds one too; this module is export's name for them.
"""

from __future__ import annotations

from runtime.artifacts import import_tensorrt
from runtime.trt_build import EngineBuildError, GpuInfo, build_serialized_engine, gpu_problem, parser_errors, query_gpu

__all__ = ["EngineBuildError", "GpuInfo", "build_serialized_engine", "gpu_problem", "import_tensorrt",
           "parser_errors", "query_gpu"]
