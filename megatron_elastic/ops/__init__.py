"""Kernels with dispatch: CUDA kernels from ``mamba_ssm`` / ``causal_conv1d`` when installed and the inputs
are on CUDA, pure-PyTorch implementations of the same algorithms otherwise."""

from .conv1d import HAVE_CAUSAL_CONV1D, causal_conv1d, causal_conv1d_step, causal_conv1d_torch
from .gated_rmsnorm import HAVE_MAMBA_SSM_NORM, gated_rmsnorm, gated_rmsnorm_torch
from .ssd import HAVE_MAMBA_SSM_SSD, conv_ssd_scan, ssd_chunk_scan, ssd_chunk_scan_torch

__all__ = [
    "HAVE_CAUSAL_CONV1D",
    "HAVE_MAMBA_SSM_NORM",
    "HAVE_MAMBA_SSM_SSD",
    "causal_conv1d",
    "causal_conv1d_step",
    "causal_conv1d_torch",
    "conv_ssd_scan",
    "gated_rmsnorm",
    "gated_rmsnorm_torch",
    "ssd_chunk_scan",
    "ssd_chunk_scan_torch",
]
