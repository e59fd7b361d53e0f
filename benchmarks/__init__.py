"""Benchmarks that produce the numbers we show users and steer by: latency tables and accuracy tables.

* ``python -m benchmarks.latency`` — per-stage and end-to-end latency, percentiles and throughput for every
  backend × precision × batch this machine can run, interleaved over rounds with the spread reported, against the
  PyTorch eager baseline and bare ONNX Runtime FP32, with the machine header and the model's compute floor
  (:mod:`benchmarks.latency`, :mod:`benchmarks.timing`, :mod:`benchmarks.compute_floor`, :mod:`benchmarks.envinfo`).
* ``python -m benchmarks.accuracy`` — accuracy, macro-F1, top-1 agreement with FP32, ECE and coverage at the stored
  rejection threshold for each deployed artifact, run through ``runtime.Classifier``.

Current numbers, each with its command and machine, are in ``benchmarks/RESULTS.md``; research in ``docs/``.
"""
