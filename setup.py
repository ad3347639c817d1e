"""Installs flan-jax: Flan-style instruction finetuning of T5 in JAX."""

from setuptools import find_namespace_packages, find_packages, setup

# `t5` depends on `seqio-nightly`, which installs into the same `seqio/`
# directory as `seqio`. launch/install.sh reinstalls the pinned `seqio` last
# so that its files win; tests/test_install.py checks the installed version.
SEQIO_VERSION = "0.0.20"

# The gin configs stay in the top-level gin/ and install as flan_jax/gin_configs/
# (data only, no __init__.py; flan_jax/config_files.py finds them), so a wheel or
# `pip install .` carries them. Its subdirectories are listed too, as setuptools asks.
GIN_PACKAGES = ["flan_jax.gin_configs"] + [f"flan_jax.gin_configs.{p}" for p in find_namespace_packages(where="gin")]

setup(
    name="flan-jax",
    version="0.1.0",
    description="Flan-style instruction finetuning of T5 encoder-decoders in JAX.",
    python_requires=">=3.11",
    packages=find_packages(include=["flan_jax", "flan_jax.*", "tasks", "tasks.*"]) + GIN_PACKAGES,
    package_dir={"flan_jax.gin_configs": "gin"},
    package_data={package: ["*.gin"] for package in GIN_PACKAGES},
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        f"seqio=={SEQIO_VERSION}",
        "t5>=0.9.4,<0.10",
        "tensorflow-text>=2.16,<2.22",
        "gin-config>=0.5,<0.6",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "tqdm>=4.66",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        # tensorflow-datasets needs it to prepare datasets but does not declare it.
        "importlib_resources>=6",
        # Data files and the Flan Collection at URLs (tasks/sources.py): http(s), memory, and more
        # with their packages (s3fs for s3://, huggingface_hub for hf://).
        "fsspec>=2024.2",
    ],
    extras_require={
        # hf://datasets/OWNER/NAME/...: the Hugging Face Hub's file system.
        "hf": ["huggingface_hub>=0.20"],
        "s3": ["s3fs>=2024.2"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "transformers>=4.40",
            "torch==2.13.0",
            "safetensors>=0.4",
            "peft>=0.13",  # tests/test_peft_interop.py
        ],
    },
    entry_points={"console_scripts": ["flan-jax=flan_jax.cli:run"]},
)
