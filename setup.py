"""hrnet_d2: HRNet backbones for Detectron2.

Detectron2 is deliberately not in install_requires: it is not on PyPI under its own
name.  See README.md ("Getting Detectron2").  This file must not import torch.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent
version = next(
    line.split('"')[1]
    for line in (here / "hrnet_d2" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="hrnet_d2",
    version=version,
    description="HRNet (HRNetV1/V2/V2p) backbones for Detectron2",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hrnet_d2", "hrnet_d2.*"]),
    package_data={"hrnet_d2": ["configs/*.yaml", "configs/**/*.yaml", "configs/*.py", "configs/**/*.py"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.13",
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools",
        "opencv-python-headless",
        "numpy",
        "tqdm",
        "safetensors",
    ],
    # int8 experiments (tools/experiment_compile_int8.py): install with --no-deps (requirements-int8.txt)
    extras_require={"test": ["pytest", "timm", "onnx", "onnxruntime"], "int8": ["torchao==0.18.0"]},
    entry_points={"console_scripts": ["hrnet-d2-convert=hrnet_d2.checkpoint.__main__:main"]},
)
