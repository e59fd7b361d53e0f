"""Checkpoint → ONNX as a library call: the model with its metadata (and the in-graph rejection score when the model
uses one), parity-checked against PyTorch, with golden references for the on-target self-check.
``python -m export`` parses its flags and calls :func:`export_checkpoint`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.contract import ModelMetadata


class ExportFailed(Exception):
    """The export stopped; ``exit_code`` is what ``python -m export`` returns for it (2 bad checkpoint, 1 parity)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ExportResult:
    path: Path
    meta: ModelMetadata
    parity: Any  # export.onnx_export.ParityResult
    goldens: Any  # runtime.check.Goldens


def _load_model(ckpt_path: Path) -> tuple[Any, ModelMetadata, dict[str, Any], list[str]]:
    """(model to export, metadata, the checkpoint's training args, output names)."""
    from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    try:
        model, meta = model_from_checkpoint(ckpt_path)
        ckpt = load_checkpoint(ckpt_path)
        ckpt_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        output_names = [meta.output_name]
        if meta.score_output:
            # A feature-space rejection score is computed inside the graph (extra output), from the statistics
            # fitted at the end of training, so every backend gets it without Python-side feature handling.
            from train.openset import scored_model, stats_from_checkpoint

            stats = stats_from_checkpoint(ckpt, meta.score, str(ckpt_path))
            model = scored_model(model, stats, meta.score, meta.temperature)
            output_names.append(meta.score_output)
    except (OSError, CheckpointError, ValueError) as e:
        raise ExportFailed(str(e)) from None
    return model, meta, ckpt_args, output_names


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                      opset: int | None = None, parity_data: str | None = None, parity_images: int = 16,
                      tolerance: float | None = None, simplify: bool = True) -> ExportResult:
    """Export ``checkpoint`` to ``out`` (default: the checkpoint path with ``.onnx``). A file that fails the parity
    check is moved to ``<out>.failed-parity`` and :class:`ExportFailed` names it."""
    from export.golden import add_goldens, make_goldens
    from export.onnx_export import (
        DEFAULT_OPSET,
        DEFAULT_PARITY_TOLERANCE,
        ParityError,
        export_onnx,
        parity_check,
        parity_inputs,
    )

    ckpt_path = Path(checkpoint)
    model, meta, ckpt_args, output_names = _load_model(ckpt_path)
    opset = DEFAULT_OPSET if opset is None else opset
    out = Path(out) if out else ckpt_path.with_suffix(".onnx")
    path = export_onnx(model, meta, out, output_names=output_names, opset=opset, simplify=simplify)
    inputs, source = parity_inputs(meta, [parity_data, ckpt_args.get("data")], n=parity_images)
    try:
        parity = parity_check(model, path, inputs, source,
                              DEFAULT_PARITY_TOLERANCE if tolerance is None else tolerance, output_names=output_names)
    except ParityError as e:
        bad = path.with_name(path.name + ".failed-parity")
        path.replace(bad)
        raise ExportFailed(f"{e}\n(the file was moved to {bad})", 1) from None
    print(parity.line())
    # Golden references for the on-target self-check (python -m runtime.check), from the parity data's folder.
    data = parity_data or ckpt_args.get("data")
    goldens = make_goldens(path, data if source != "generated images" else None, meta,
                           build_command=f"python -m export --checkpoint {ckpt_path} --out {path}")
    add_goldens(path, goldens)
    return ExportResult(path, meta, parity, goldens)
