"""Which kernel computes each part of a model, decided in one place.

``train`` builds the student and the frozen teacher from :func:`student_kernels` / :func:`teacher_kernels` on
:meth:`Machine.here`; ``plan`` counts activation memory from the same functions on the machine it is asked about
(``--kernels``), and prints the result. The operators themselves dispatch on the same facts
(``ops.ssd.HAVE_MAMBA_SSM_SSD``, ``ops.conv1d.HAVE_CAUSAL_CONV1D``, CUDA tensors).

* attention: ``sdpa`` (:class:`~megatron_elastic.model.sdpa_attention.SDPAttention`: flash / cuDNN /
  memory-efficient kernels on CUDA, PyTorch's fused CPU kernel otherwise; every sliced head count) or ``te``
  (TransformerEngine's fused attention, teacher only). Never the ``s x s`` probabilities.
* Mamba scan and conv: ``mamba_ssm`` / ``causal_conv1d`` kernels on CUDA when installed, else the pure-PyTorch
  chunked SSD scan and ``F.conv1d`` (same algorithm, more activation memory; on the CPU the scan runs at its own
  chunk length, ``ops.ssd.cpu_chunk_size``: a blocking choice that leaves the result unchanged).
* float32 matrix products on the CPU: oneDNN where it beats torch's BLAS (MKL runs AVX2 code on AMD processors),
  measured once per process (``ops.cpu_gemm``); the same products, another summation order.
* norms and linears: TransformerEngine's fused norm+linear (``te``, teacher only: nothing is sliced) or
  Megatron's local linears with unfused RMSNorm (``local``: the elastic student everywhere).
* sequence parallelism: whatever the config says (``parallel.sequence_parallel``), the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What a machine offers the model: CUDA and the optional kernel packages."""

    cuda: bool
    mamba_ssm: bool
    causal_conv1d: bool
    transformer_engine: bool

    @classmethod
    def here(cls) -> "Machine":
        import torch

        from megatron_elastic.ops.conv1d import HAVE_CAUSAL_CONV1D
        from megatron_elastic.ops.ssd import HAVE_MAMBA_SSM_SSD

        try:
            import transformer_engine  # noqa: F401

            te = True
        except ImportError:
            te = False
        return cls(torch.cuda.is_available(), HAVE_MAMBA_SSM_SSD, HAVE_CAUSAL_CONV1D, te)


# What `plan --kernels` may assume about the training machine.
MACHINES = {
    "fused": Machine(cuda=True, mamba_ssm=True, causal_conv1d=True, transformer_engine=True),  # the Docker image
    "reference": Machine(cuda=True, mamba_ssm=False, causal_conv1d=False, transformer_engine=False),
}


@dataclass(frozen=True)
class KernelPath:
    backend: str  # the ModuleSpec backend: "local" or "te"
    attention: str  # "sdpa" or "te"
    mamba_scan: str  # "mamba_ssm" or "torch"
    conv1d: str  # "causal_conv1d" or "torch"
    norm: str  # "torch" (separate RMSNorm) or "te" (fused into the next linear)
    sequence_parallel: bool

    def describe(self) -> str:
        return (
            f"{self.backend} spec: attention {self.attention}, Mamba scan {self.mamba_scan}, conv1d {self.conv1d}, "
            f"norms {self.norm}, sequence parallel {'on' if self.sequence_parallel else 'off'}"
        )


def _mamba_kernels(machine: Machine):
    return (
        "mamba_ssm" if machine.cuda and machine.mamba_ssm else "torch",
        "causal_conv1d" if machine.cuda and machine.causal_conv1d else "torch",
    )


def student_kernels(machine: Machine, sequence_parallel: bool = False) -> KernelPath:
    """The elastic student: the local elastic spec (sliced weights), on whatever fused kernels take any size."""
    return KernelPath("local", "sdpa", *_mamba_kernels(machine), "torch", sequence_parallel)


def teacher_kernels(machine: Machine, sequence_parallel: bool = False) -> KernelPath:
    """The frozen teacher is the whole parent, never sliced: TransformerEngine's spec when it can run, else local."""
    te = machine.cuda and machine.transformer_engine
    return KernelPath(
        "te" if te else "local",
        "te" if te else "sdpa",
        *_mamba_kernels(machine),
        "te" if te else "torch",
        sequence_parallel,
    )
