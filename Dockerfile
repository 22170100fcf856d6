# megatron-elastic on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, TransformerEngine and apex included).
#   docker build -t megatron-elastic:latest .
#   docker run --gpus all --rm -it -v /data:/data -v /checkpoints:/checkpoints megatron-elastic:latest \
#       megatron-elastic plan --config examples/nemotron_nano_v2_12b/elastic.yaml --nodes 16
# Kernels are compiled for Hopper (sm_90, H100); set TORCH_CUDA_ARCH_LIST to build for other GPUs.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.19.2
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
ARG MODELOPT_VERSION=0.47.0
ARG TRANSFORMERS_VERSION=5.23.0
ARG TORCH_CUDA_ARCH_LIST=9.0

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=16 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Pinned Megatron-Core and ModelOpt; Mamba kernels built from source against the container's torch/CUDA.
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" "nvidia-modelopt==${MODELOPT_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
 && CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation "causal-conv1d==${CAUSAL_CONV1D_VERSION}" \
 && MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation "mamba-ssm==${MAMBA_SSM_VERSION}"

# This package (its other dependencies are small; torch comes from the base image).
WORKDIR /opt/megatron_elastic
COPY setup.py pyproject.toml README.md ./
COPY megatron_elastic ./megatron_elastic
COPY examples ./examples
COPY launch ./launch
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[hf]"

# No network at run time: model hubs offline, everything the recipes need is inside the image or mounted.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 1000 --shell /bin/bash elastic \
 && mkdir -p /workspace \
 && chown elastic:elastic /workspace
USER 1000:1000
WORKDIR /workspace

# Smoke test at build time: the CLI imports and the GPU kernels are importable.
RUN megatron-elastic --help > /dev/null \
 && python -c "import mamba_ssm, causal_conv1d, megatron.core; print('megatron-core', megatron.core.__version__)"

CMD ["megatron-elastic", "--help"]
