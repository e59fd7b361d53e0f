"""Test helper: serve a stock-Triton model repository (``python -m export.triton``) the way stock Triton would.

PyTriton's server has only the Python backend, so it cannot load ``model.onnx`` itself: this binds a Python model
with exactly the repository's interface (its ``config.pbtxt`` parsed with Triton's own schema: input and output
names, dtypes, dims, ``max_batch_size``, dynamic batching, and every ``parameters`` entry), which runs the ONNX
file with ONNX Runtime. Run it with the serve venv's interpreter and its shared libpython on ``LD_LIBRARY_PATH``::

    python tests/runtime/raw_triton_server.py REPO/NAME --grpc-port P --http-port P --metrics-port P

It prints one JSON line ``{"event": "ready", ...}`` when the model is ready and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="REPO/NAME folder written by `python -m export.triton`")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.models.model import Model
    from pytriton.triton import Triton, TritonConfig

    cfg = text_format.Parse((args.model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx", cfg.platform
    session = ort.InferenceSession(str(args.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = cfg.input
    assert inp.data_type == mc.TYPE_FP32
    out_dims = {o.name: tuple(o.dims) for o in cfg.output}
    names = list(out_dims)
    params = {k: v.string_value for k, v in cfg.parameters.items()}

    # The config's parameters travel into the config PyTriton hands to Triton, as stock Triton would serve them.
    original = Model._get_triton_model_config

    def with_parameters(self: Any) -> Any:
        tmc = original(self)
        tmc.backend_parameters.update(params)
        return tmc

    Model._get_triton_model_config = with_parameters

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs[inp.name]
        outs = session.run(names, {inp.name: x})
        return {n: np.asarray(o, np.float32).reshape(len(x), *out_dims[n]) for n, o in zip(names, outs)}

    batched = cfg.max_batch_size > 0
    inputs = [Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.dims))]
    outputs = [Tensor(name=n, dtype=np.float32, shape=d) for n, d in out_dims.items()]
    model_config = ModelConfig(batching=batched, max_batch_size=cfg.max_batch_size if batched else 1,
                               batcher=DynamicBatcher(
                                   max_queue_delay_microseconds=cfg.dynamic_batching.max_queue_delay_microseconds))
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          log_verbose=0)
    events = sys.stdout
    sys.stdout = sys.stderr  # PyTriton echoes the server's log with print(): stdout is for the ready line

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    triton = Triton(config=config)
    try:
        triton.bind(model_name=cfg.name, infer_func=infer, inputs=inputs, outputs=outputs, config=model_config,
                    strict=False)
        triton.run()
        print(json.dumps({"event": "ready", "name": cfg.name}), file=events, flush=True)
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
