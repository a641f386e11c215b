"""Package metadata and dependencies of moeflow (build system and tool config: pyproject.toml)."""

from pathlib import Path

from setuptools import find_packages, setup

# Tests cross-check against these exact peer versions; keep them pinned together.
PEERS = ["deepspeed==0.19.8", "megatron-core==0.16.1"]
# moeflow.integrations.hf; install with the torch pin as a constraint so pip keeps your torch.
HF = ["transformers==5.24.0"]
# moeflow data prepare: tokenizers, and the readers of JSONL / Parquet / `datasets` folders.
DATA = ["tokenizers>=0.20", "datasets>=3", "pyarrow>=15"]

setup(
    name="moeflow",
    version="0.1.0",
    description=(
        "Mixture-of-Experts training for PyTorch: expert-parallel layers, pluggable routers, "
        "adaptive parallelism, ILP expert placement"
    ),
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["moeflow", "moeflow.*"]),
    # A range, so a GPU user keeps the CUDA build of torch they already have.
    install_requires=[
        "torch>=2.4,<3",
        "numpy",
        "pulp>=2.8",
        "highspy>=1.7",
        "tqdm",
        "tomli>=2; python_version < '3.11'",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "wandb": ["wandb"],
        "hf": HF,
        "data": DATA,
        "integrations": [*PEERS, *HF],
        "dev": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.7", "wandb", *PEERS, *HF, *DATA],
    },
    entry_points={"console_scripts": ["moeflow = moeflow.launch.cli:main"]},
)
