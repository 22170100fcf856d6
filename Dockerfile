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

# NGC images pin their whole Python environment through PIP_CONSTRAINT (/etc/pip/constraint.txt), which rejects
# the pins below (transformers, for one). Like Megatron-LM's own images we replace it, but keep the image's CUDA
# stack as NVIDIA built and tested it: torch, TransformerEngine, triton, apex, flash-attn and the nvidia-* wheels.
RUN mkdir -p /etc/pip \
 && python -m pip list --format=freeze \
    | grep -iE '^(torch|torchvision|transformer[-_]engine[-_a-z0-9]*|triton|apex|flash[-_]attn|nvidia-[a-z0-9-]+)==' \
    > /etc/pip/keep-cuda-stack.txt
ENV PIP_CONSTRAINT=/etc/pip/keep-cuda-stack.txt

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
# Run-time settings: Triton's kernel cache on local disk (not a shared home), PyTorch's expandable segments (less
# fragmentation when context length changes between curriculum stages). The collective timeout is a config field
# (parallel.distributed_timeout_minutes); launch/slurm sets the NCCL variables of a cluster.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton-cache \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# A non-root user with uid 1000: the base image's own (Ubuntu 24.04 images have `ubuntu`) or a new one. Under
# pyxis/enroot the job runs as the submitting user anyway. The recipes and launch scripts are reachable from the
# working directory, so `--config examples/...` works as in the README.
RUN (id -u 1000 > /dev/null 2>&1 || useradd --create-home --uid 1000 --shell /bin/bash elastic) \
 && mkdir -p /workspace \
 && ln -s /opt/megatron_elastic/examples /workspace/examples \
 && ln -s /opt/megatron_elastic/launch /workspace/launch \
 && chown -h 1000:1000 /workspace /workspace/examples /workspace/launch
USER 1000:1000
WORKDIR /workspace

# Smoke test at build time: the CLI imports and the GPU kernels are importable.
RUN megatron-elastic --help > /dev/null \
 && python -c "import mamba_ssm, causal_conv1d, megatron.core; print('megatron-core', megatron.core.__version__)"

CMD ["megatron-elastic", "--help"]
