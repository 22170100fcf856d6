"""One place for everything that differs between Megatron-Core releases and between CPU and GPU.

* megatron-core 0.16/0.17 call the hybrid model ``MambaModel`` (``hybrid_override_pattern``); 0.18+ call it
  ``HybridModel`` (``hybrid_layer_pattern``) and keep ``MambaModel`` as a deprecated shim.
* Without CUDA, Megatron-Core's tensor-parallel code allocates on ``torch.cuda.current_device()`` and forks a
  CUDA RNG tracker. :func:`apply_cpu_shims` routes the first to ``"cpu"`` and installs
  :class:`CpuRNGStatesTracker`, a tracker with the same semantics over the CPU generator. Nothing is patched
  when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
from typing import Any

import megatron.core
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import random as mcore_random
from packaging.version import Version

MCORE_VERSION = Version(megatron.core.__version__)

try:  # megatron-core >= 0.18
    from megatron.core.models.hybrid.hybrid_model import HybridModel as _HybridModelClass  # type: ignore

    _STACK_MODULE = "megatron.core.models.hybrid.hybrid_block"
    _STACK_CLASS, _STACK_SUBMODULES = "HybridStack", "HybridStackSubmodules"
    PATTERN_KWARG = "hybrid_layer_pattern"
    STACK_SPEC_KWARG = "hybrid_stack_spec"
except ImportError:  # megatron-core 0.16 / 0.17
    from megatron.core.models.mamba.mamba_model import MambaModel as _HybridModelClass

    _STACK_MODULE = "megatron.core.ssm.mamba_block"
    _STACK_CLASS, _STACK_SUBMODULES = "MambaStack", "MambaStackSubmodules"
    PATTERN_KWARG = "hybrid_override_pattern"
    STACK_SPEC_KWARG = "mamba_stack_spec"

HybridModel = _HybridModelClass
_stack_module = importlib.import_module(_STACK_MODULE)
HybridStack = getattr(_stack_module, _STACK_CLASS)
HybridStackSubmodules = getattr(_stack_module, _STACK_SUBMODULES)

# megatron-core >= 0.18's hybrid stack recomputes its layers itself under recompute_granularity="full"
# (megatron.core.recompute.checkpointed_forward); 0.16/0.17's MambaStack ignores the setting, so
# megatron_elastic.model.stack adds per-layer recompute there. The shim goes when 0.16/0.17 support does.
STACK_HAS_NATIVE_RECOMPUTE = hasattr(_stack_module, "checkpointed_forward")

# Megatron's pattern symbols ("M" Mamba, "*" attention, "-" MLP, "E" MoE; "|" pipeline split on 0.18+).
MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
SUPPORTED_SYMBOLS = (MAMBA, ATTENTION, MLP)


def build_hybrid_model(*, stack_spec, pattern: str, **kwargs: Any) -> torch.nn.Module:
    """Build Megatron's hybrid language model under whichever name and keywords this release uses."""
    params = inspect.signature(HybridModel.__init__).parameters
    kwargs[STACK_SPEC_KWARG] = stack_spec
    pp = getattr(kwargs.get("config"), "pipeline_model_parallel_size", 1)
    if PATTERN_KWARG == "hybrid_layer_pattern" and pp > 1 and "|" not in pattern:
        # 0.18+ deprecates splitting a pattern without '|' over PP stages; write the same equal split explicitly.
        per_stage = len(pattern) // pp
        pattern = "|".join(pattern[i * per_stage : (i + 1) * per_stage] for i in range(pp))
    kwargs[PATTERN_KWARG] = pattern
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise TypeError(f"{HybridModel.__name__} in megatron-core {MCORE_VERSION} has no argument(s) {unknown}")
    return HybridModel(**kwargs)


def add_layer_recompute(layers) -> None:
    """megatron-core 0.16/0.17 shim (their hybrid stack ignores ``recompute_granularity="full"``): checkpoint each
    layer's training forward, so only its input is kept and it re-runs in the backward pass. 0.18+ recompute in
    the stack itself (``STACK_HAS_NATIVE_RECOMPUTE``); this goes with 0.16/0.17 support."""
    for layer in layers:
        layer.forward = functools.partial(_recomputed, layer, layer.forward)


def _recomputed(layer, forward, *args, **kwargs):
    """Activation recomputation for one layer (training only; inference and no-grad passes run it plainly)."""
    if not layer.training or not torch.is_grad_enabled() or kwargs.get("inference_context") is not None:
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def support_mixed_dtype_parameters(optimizer) -> None:
    """Megatron's mixed-precision optimizers for a model that mixes bf16/fp16 and fp32 parameters (ours in bf16
    keeps norms, ``A_log`` and ``D`` in fp32; Megatron-LM casts every parameter to bf16 first), whose state-dict
    paths otherwise read another parameter's state (a checkpoint save fails with a size mismatch, or reads the wrong
    shard). Goes when Megatron's optimizers number their parameters as the inner optimizer does.

    * ``DistributedOptimizer`` records each parameter's place among its group's main parameters as its place in the
      gradient buffer, but orders the group's main parameters fp32 parameters first, then the fp32 copies of
      bf16/fp16 ones: re-indexed by the real order.
    * ``Float16OptimizerWithFloat16Params`` (``distributed_optimizer: false``) numbers the inner optimizer's
      parameters as if every one were a bf16/fp16 parameter with an fp32 main copy, so each fp32 parameter shifts
      the state of every later one: each fp32 parameter gets a main copy too (bytes of the norms, ``A_log`` and
      ``D`` only), so that every parameter is one the optimizer's paths handle.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.config.use_precision_aware_optimizer:
            for g, (fp32, half) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups)):
                for k, param in enumerate(fp32):
                    opt.model_param_group_index_map[param] = (g, k)
                for k, param in enumerate(half):
                    opt.model_param_group_index_map[param] = (g, len(fp32) + k)
        elif isinstance(opt, Float16OptimizerWithFloat16Params) and not opt.is_stub_optimizer:
            _main_copies_of_fp32_parameters(opt)


def _main_copies_of_fp32_parameters(opt) -> None:
    """Every fp32 parameter of ``opt`` (a ``Float16OptimizerWithFloat16Params``) handled as Megatron handles a
    bf16 one: an fp32 main copy in the inner optimizer's group, at the parameter's place, and both in the
    optimizer's model/main lists in the group's order (what its state-dict paths assume)."""
    from megatron.core import tensor_parallel

    for g, group in enumerate(opt.optimizer.param_groups):
        fp32 = {id(p) for p in opt.fp32_from_fp32_groups[g]}
        if not fp32:
            continue
        main_of = {id(m): (p, m) for p, m in zip(opt.float16_groups[g], opt.fp32_from_float16_groups[g])}
        pairs = []
        for i, param in enumerate(group["params"]):
            if id(param) in fp32:
                main = param.detach().clone()
                tensor_parallel.copy_tensor_model_parallel_attributes(main, param)
                if hasattr(param, "shared"):
                    main.shared = param.shared
                param.main_param = main
                if param in opt.optimizer.state:
                    opt.optimizer.state[main] = opt.optimizer.state.pop(param)
                group["params"][i] = main
                pairs.append((param, main))
            else:
                pairs.append(main_of[id(param)])
        opt.float16_groups[g] = [p for p, _ in pairs]
        opt.fp32_from_float16_groups[g] = [m for _, m in pairs]
        opt.fp32_from_fp32_groups[g] = []


def async_save_options() -> dict:
    """Keyword arguments of ``dist_checkpointing.save(..., async_sharded_save=True)``: megatron-core 0.19 defaults to
    NVIDIA Resiliency Extension's writer (``async_strategy="nvrx"``, a package we do not install); Megatron's own
    (``"mcore"``, the only one before 0.19) is what is tested here. Goes with 0.16 support (then always pass it)."""
    import inspect

    from megatron.core import dist_checkpointing

    return (
        {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}
    )


def prepare_optimizer_for_load(optimizer) -> None:
    """Before loading a checkpoint into an optimizer: megatron-core's DistributedOptimizer without Apex or
    TransformerEngine (torch's Adam: the CPU, or a GPU without TE) is not loadable as Megatron ships it, a path
    Megatron-LM never takes (TE is installed):

    * building its sharded state dict for loading reads one shared ``step`` from the inner optimizer's
      per-parameter state, which a fresh optimizer does not have (``assert len(steps) == 1``): give it zero
      state at step 0, which the load overwrites;
    * loading the parameter state copies every entry of a parameter's state from the checkpoint, ``step``
      included, which the checkpoint keeps in ``param_groups``: the fully reshardable state lacks it
      (``KeyError: 'step'``), the per-rank (dp_reshardable) state carries the *loading* optimizer's step (a
      resume restarts Adam's bias correction at step 0). The step is left as ``load_state_dict`` set it from
      ``param_groups``, but as each parameter's own tensor: Megatron gives every parameter the same ``step``
      tensor, which torch's Adam then increments once per parameter (wrong bias correction from the first
      step after a resume on).

    Both go when Megatron handles torch's Adam in its distributed optimizer (or when TE is required)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    _keep_step_when_loading_param_state(DistributedOptimizer)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or any(len(s) for s in inner.state.values()):
            continue
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _keep_step_when_loading_param_state(cls) -> None:
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_keeps_step", False):
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        if "step" in state:
            state["step"] = state["step"].detach().clone()
            tensors["step"] = state["step"]
        return original(self, model_param, tensors)

    set_states._keeps_step = True
    cls._set_main_param_and_optimizer_states = set_states


def mlp_submodule(mlp_cls, submodules):
    """The ``mlp`` entry of a TransformerLayer spec. megatron-core >= 0.18 builds a layer's MLP through
    ``MLP.as_mlp_submodule`` (and rewrites, with a warning, a plain ``ModuleSpec(module=MLP)`` given to it);
    0.16/0.17 build it from that ModuleSpec. The ModuleSpec branch goes with 0.16/0.17 support."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(mlp_cls, "as_mlp_submodule"):
        return functools.partial(mlp_cls.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=mlp_cls, submodules=submodules)


_WRITERS_CONTAINED = False


def contain_checkpoint_writer_processes() -> None:
    """Keep Megatron's checkpoint writer from leaving processes behind when the trainer is killed (SIGKILL,
    preemption). Idempotent; called before each save.

    * ``dist_checkpointing``'s file writer collects write results in a module-level queue that it creates, on
      first use, as ``multiprocessing.get_context("spawn").Manager().Queue()``: a server process (a fresh
      interpreter importing the main module, ~300 MB) that nothing stops when the trainer dies. A fork-context
      ``multiprocessing.Queue`` (a pipe, no server) holds them instead: an asynchronous save's writer, forked
      from the trainer, inherits it and puts its results there; a synchronous save puts and takes them in this
      process.
    * Each save forks one writer per file bucket, synchronised with the trainer by multiprocessing locks; a
      writer whose trainer died holding one waits forever. Forked children of this process are therefore asked
      (Linux ``PR_SET_PDEATHSIG``) to receive SIGKILL when it dies; the checkpoint being written is a ``.tmp``
      directory that resuming ignores.
    """
    global _WRITERS_CONTAINED
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = _write_results_queue()
    if not _WRITERS_CONTAINED and hasattr(os, "register_at_fork") and sys.platform.startswith("linux"):
        os.register_at_fork(before=_note_forking_process, after_in_child=_die_with_parent)
        _WRITERS_CONTAINED = True


def _write_results_queue():
    """A fork-context ``multiprocessing.Queue`` whose ``get_nowait`` (what Megatron's writer calls once the write is
    done) waits up to a minute for the result to come through the pipe: a put in this process travels through the
    queue's feeder thread, so an immediate non-blocking get could find it not yet there."""
    import multiprocessing
    import multiprocessing.queues

    class WriteResultsQueue(multiprocessing.queues.Queue):
        def get_nowait(self):
            return self.get(timeout=60)

    return WriteResultsQueue(ctx=multiprocessing.get_context("fork"))


_FORKING_PID = None  # the process that is forking (set just before, inherited by the child)


def _note_forking_process() -> None:
    global _FORKING_PID
    _FORKING_PID = os.getpid()


def _die_with_parent() -> None:
    """In a freshly forked child (of the trainer, or of a writer it forked: an asynchronous save forks one that
    forks its own): SIGKILL when its parent dies (and now, if it already has), so a killed trainer's tree ends."""
    parent_pid = _FORKING_PID
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def foldable(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides a new tensor of its shape has, where it differs only in size-1 dimensions (a
    zero-copy view). ``transpose(0, 1).contiguous()`` of a one-sequence ``[1, s, h]`` batch keeps the stride
    ``s * h`` on its size-1 batch dimension; ``torch.matmul`` then cannot fold ``[s, 1, h] @ w.T`` into one
    matrix product for a weight without gradient (the frozen teacher, evaluation, importance, generation) and
    runs a batched product over ``w`` expanded ``s`` times, which the CPU kernel copies: 1.6 GiB for one 12B Mamba
    ``out_proj`` shard at ``s = 128``. Goes when torch's CPU ``bmm`` stops copying expanded operands."""
    if x.dim() < 3 or not x.is_contiguous():
        return x
    for d in range(x.dim() - 1):
        if x.shape[d] == 1 and x.stride(d) != x.stride(d + 1) * x.shape[d + 1]:
            x = x.squeeze(d).unsqueeze(d)
    return x


def cuda_available() -> bool:
    return torch.cuda.is_available()


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's named-RNG-state tracker over the CPU generator (used only when CUDA is absent).

    ``fork(name)`` swaps the CPU generator to the named stream and back, exactly as the CUDA tracker does for
    the CUDA generator, so dropout under tensor parallelism draws from the same named streams.
    """

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Inside this mode, tensors that Megatron-Core asks for on ``"cuda"`` (factory calls with
    ``device="cuda"`` and ``Tensor.cuda()``) are made on the CPU, and ``Tensor.type()`` names the CPU
    tensor types as the CUDA ones. Megatron's optimizer, gradient clipping and pipeline schedules hard-code
    such scalars and type checks; on a machine without CUDA this lets them run unchanged."""

    _FACTORY_DEVICE_KWARG = "device"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts grads are 'torch.cuda.FloatTensor'; the CPU stands in for the device here.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        dev = kwargs.get(self._FACTORY_DEVICE_KWARG)
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs = {**kwargs, self._FACTORY_DEVICE_KWARG: "cpu"}
        return func(*args, **kwargs)


_PROCESS_MODE: CudaToCpuMode | None = None


def eager_fused_functions() -> None:
    """Megatron's fused element-wise functions are ``torch.compile``d (``megatron.core.jit.jit_fuser``). An elastic
    run feeds them many shapes (every budget's widths, every stage's sequence length): dynamo recompiles, keeps static
    and dynamic graphs, falls back to eager past its cache limit, and activation recomputation can re-run a layer
    through another graph than its forward did, saving different tensors ("Recomputed values ... have different
    metadata", pytorch#166926; reproduced here by a PP run with recompute across a stage switch). They run eagerly
    in our processes: the same code in the forward and the recomputation."""
    torch._dynamo.config.disable = True


def enable_cpu_backend() -> None:
    """Once per process, without CUDA: the CPU shims (:func:`apply_cpu_shims`) and :class:`CudaToCpuMode` for
    every later torch call of this thread, until :func:`disable_cpu_backend`. A no-op with CUDA or when on."""
    global _PROCESS_MODE
    if cuda_available():
        return
    apply_cpu_shims()
    if _PROCESS_MODE is None:
        _PROCESS_MODE = CudaToCpuMode()
        _PROCESS_MODE.__enter__()


def disable_cpu_backend() -> None:
    """Leave the process-wide :class:`CudaToCpuMode` (the shims stay: they are harmless without the mode)."""
    global _PROCESS_MODE
    if _PROCESS_MODE is None:
        return
    top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
    if top is not _PROCESS_MODE:
        raise RuntimeError(
            "disable_cpu_backend: another TorchFunctionMode was entered after enable_cpu_backend and is still "
            "active; leave it first"
        )
    _PROCESS_MODE.__exit__(None, None, None)
    _PROCESS_MODE = None


@contextlib.contextmanager
def cpu_backend_suspended():
    """Run the block without the process-wide :class:`CudaToCpuMode`: every torch call inside it dispatches
    without a Python hop (tens of thousands per generated token batch on a small model). For forward passes of a
    built model (decoding, scoring), which ask for no CUDA tensor; Megatron's optimizer and schedules need the mode.
    A no-op when the mode is off or another mode was entered after it."""
    mode = _PROCESS_MODE
    if mode is None or torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


class _CpuStream:
    """What Megatron asks of ``torch.cuda.current_stream()``, for a CPU process: waits are no-ops."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_SHIMS_APPLIED = False


def apply_cpu_shims() -> None:
    """Let Megatron-Core's tensor-parallel layers run on CPU (gloo). A no-op when CUDA is available.

    ``torch.cuda.current_device`` returns ``"cpu"`` so Megatron's ``device=torch.cuda.current_device()``
    allocations land on the CPU; ``torch.cuda.synchronize`` is a no-op; the RNG tracker is replaced by
    :class:`CpuRNGStatesTracker`.
    """
    global _SHIMS_APPLIED
    if cuda_available() or _SHIMS_APPLIED:
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # dist_checkpointing's writer synchronises CUDA before reading tensors; on CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    # megatron-core >= 0.18's DDP grad sync orders its collectives after the current CUDA stream; the CPU runs
    # one stream of work in program order, so every wait is already satisfied.
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()  # type: ignore[assignment]
    # Megatron's activation checkpoint (tensor_parallel.checkpoint, used by 0.18+'s hybrid stack for
    # recompute) saves and restores "the device generator" next to the CPU one; without CUDA the device
    # generator is the CPU generator.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _SHIMS_APPLIED = True


class _Done:
    """The work handle of a collective that already finished (what ``async_op=True`` callers wait on)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def reduce_scatter_by_all_reduce(output, input, op=None, group=None, async_op=False):
    """``torch.distributed.reduce_scatter_tensor`` for a backend without it: all-reduce ``input`` (the whole
    ``world * output.numel()`` elements), keep this rank's chunk along dim 0. Twice the traffic of a real
    reduce-scatter; the same result."""
    reduced = input.clone()
    dist.all_reduce(reduced, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    output.copy_(reduced.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].reshape(output.shape))
    return _Done() if async_op else None


# Where Megatron binds the reduce-scatter it calls (module globals, bound at import).
_REDUCE_SCATTER_USERS = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.distributed.param_and_grad_buffer",
)


def ensure_reduce_scatter() -> bool:
    """Give the default process group a reduce-scatter if its backend has none (older gloo builds): probe it
    once (a collective: every rank calls this from ``parallel.initialize_parallel``), and only if the probe
    fails route torch's and Megatron's reduce-scatter through :func:`reduce_scatter_by_all_reduce`. Returns
    whether the shim was installed. Goes when every supported torch's gloo reduce-scatters (2.13's does)."""
    if dist.get_backend() != "gloo" or dist.get_world_size() == 1:
        return False  # NCCL has it; one process never reduce-scatters
    probe = torch.zeros(dist.get_world_size())
    try:
        dist.reduce_scatter_tensor(torch.zeros(1), probe)
        return False
    except RuntimeError:
        pass
    dist.reduce_scatter_tensor = reduce_scatter_by_all_reduce
    dist._reduce_scatter_base = reduce_scatter_by_all_reduce
    for name in _REDUCE_SCATTER_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "dist_reduce_scatter_func"):
            module.dist_reduce_scatter_func = reduce_scatter_by_all_reduce
    return True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed the default generator and Megatron's named model-parallel RNG streams (CPU or CUDA)."""
    torch.manual_seed(seed)
    if cuda_available():
        mcore_random.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core import parallel_state

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    # Same offsets as megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed.
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
