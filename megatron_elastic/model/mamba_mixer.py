"""A Mamba-2 mixer that is a drop-in for Megatron-Core's ``MambaMixer`` and runs without ``mamba_ssm``.

Same constructor arguments, parameter names and shapes (``in_proj``, ``conv1d.{weight,bias}``, ``dt_bias``,
``A_log``, ``D``, ``norm.weight``, ``out_proj``), the same per-TP-rank ``in_proj`` layout
``[z | x | B | C | dt]`` and the same ``sharded_state_dict`` (``in_proj.weight.{z,x,B,C,dt}``,
``conv1d.{weight,bias}.{x,B,C}``), so Megatron distributed checkpoints load into it and back. The math
calls :mod:`megatron_elastic.ops`, which uses the CUDA kernels when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Union

import torch
import torch.nn as nn
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_elastic import ops
from megatron_elastic.compat import foldable
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.layouts import MambaLayout


@dataclass
class MixerView:
    """The local tensors and sizes one forward pass of a mixer uses (full, or a nested slice of it)."""

    nheads: int
    headdim: int
    conv_weight: torch.Tensor  # (x_channels + 2*ngroups*d_state, d_conv)
    conv_bias: Optional[torch.Tensor]
    dt_bias: torch.Tensor  # (nheads,)
    A_log: torch.Tensor  # (nheads,)
    D: torch.Tensor  # (nheads,) or (nheads*headdim,)
    norm_weight: Optional[torch.Tensor]
    norm_group_size: int


@dataclass
class MambaMixerSubmodules:
    """Specs of the input and output projections (same fields as Megatron's ``MambaMixerSubmodules``)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class GatedRMSNorm(nn.Module):
    """Grouped gated RMSNorm with Megatron's ``ExtendedRMSNorm`` parameter (``weight``) and TP sharding."""

    def __init__(
        self,
        hidden_size: int,
        group_size: int,
        eps: float = 1e-5,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
        tp_group=None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.gated_rmsnorm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


def _split_sharded_tensor(sh_ten: ShardedTensor, sizes: List[int], names: List[str]) -> ShardedTensorFactory:
    """Store a per-rank concatenation (dim 0) as independent sharded tensors ``<key>.<name>``.

    A checkpoint written this way has one global tensor per part (e.g. ``in_proj.weight.x``), so it does
    not depend on how many TP ranks interleaved the parts when it was written.
    """
    if sum(sizes) != sh_ten.local_shape[0]:
        raise ValueError(f"parts {dict(zip(names, sizes))} do not cover dim 0 of {sh_ten.key} ({sh_ten.local_shape})")
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(
            template, key=key, data=t, dtype=t.dtype, replica_id=replica_id, flattened_range=flattened_range
        )
        parts, start = [], 0
        for size, name in zip(sizes, names):
            for part in whole.narrow(0, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


# megatron-core >= 0.18's names of the conv parameters -> this mixer's (and 0.16's) names.
MEGATRON_CONV_PARAMETER_NAMES = {"conv1d_weight": "conv1d.weight", "conv1d_bias": "conv1d.bias"}


class MambaMixer(MegatronModule):
    """Mamba-2 mixer; see the module docstring. Input/output ``[seq, batch, d_model]``.

    Sizes (global / local to a TP rank) follow Megatron: ``nheads = config.mamba_num_heads`` (or
    ``expand * d_model / headdim``), ``d_inner = nheads * headdim``; heads and groups are split over TP.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MambaMixerSubmodules,
        d_model: int,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        A_init_range=(1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 128,
        layer_number: Optional[int] = None,
        use_mem_eff_path=None,
        d_state=None,
        headdim=None,
        ngroups=None,
        pg_collection: ProcessGroupCollection = None,
        pp_layer_offset: int = 0,
        name: Optional[str] = None,  # megatron-core >= 0.18 passes the module name
    ):
        super().__init__(config)
        if pg_collection is None:
            raise ValueError("MambaMixer needs pg_collection (a ProcessGroupCollection with at least .tp)")
        if bias:
            raise ValueError("MambaMixer: bias=True is not supported (Megatron's MambaMixer asserts not bias)")
        if norm_before_gate:
            raise ValueError("MambaMixer: norm_before_gate=True is not supported (as in Megatron's MambaMixer)")
        self.config = config
        self.d_model, self.d_conv, self.expand = d_model, d_conv, expand
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.chunk_size, self.layer_number, self.pp_layer_offset = chunk_size, layer_number, pp_layer_offset
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        self._set_sizes(config, expand, d_model)
        self.in_proj = self._tp_linear(
            submodules.in_proj,
            self.d_model,
            2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads,
            config.init_method,
            "fc1",
            gather_output=False,
            skip_bias_add=False,
        )
        self._build_local_parameters(config, conv_bias)
        if config.perform_initialization:
            tp = self.tp_group.size()
            self._init_tp_invariant(self.tp_group.rank(), tp, conv_init, A_init_range, dt_min, dt_max, dt_init_floor)
        self.out_proj = self._tp_linear(
            submodules.out_proj,
            self.d_inner,
            self.d_model,
            config.output_layer_init_method,
            "fc2",
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def _set_sizes(self, config, expand: int, d_model: int) -> None:
        """Global and this rank's head, group and channel counts, checked against the TP size."""
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        if config.mamba_num_heads is not None:
            self.nheads = config.mamba_num_heads
        else:
            if (expand * d_model) % self.headdim:
                raise ConfigError(
                    f"expand*d_model ({expand * d_model}) must be divisible by mamba_head_dim ({self.headdim})"
                )
            self.nheads = expand * d_model // self.headdim
        self.d_inner = self.nheads * self.headdim

        tp = self.tp_group.size()
        if self.nheads % tp:
            raise ConfigError(f"mamba_num_heads ({self.nheads}) must be divisible by tensor_model_parallel_size ({tp})")
        if self.ngroups % tp:
            raise ConfigError(
                f"mamba_num_groups ({self.ngroups}) must be divisible by tensor_model_parallel_size ({tp})"
            )
        if self.nheads % self.ngroups:
            raise ConfigError(f"mamba_num_heads ({self.nheads}) must be divisible by mamba_num_groups ({self.ngroups})")
        self.nheads_local_tp = self.nheads // tp
        self.d_inner_local_tp = self.d_inner // tp
        self.ngroups_local_tp = self.ngroups // tp
        # This rank's part sizes of the packed tensors (z, x, B, C, dt rows of in_proj; x, B, C channels of conv1d).
        self.layout = MambaLayout(self.nheads_local_tp, self.headdim, self.ngroups_local_tp, self.d_state)

    def _tp_linear(self, spec, input_size: int, output_size: int, init_method, buffer_name: str, **kwargs):
        """A tensor-parallel projection built from its spec (column- or row-parallel by the spec)."""
        return build_module(
            spec,
            input_size,
            output_size,
            config=self.config,
            init_method=init_method,
            bias=False,
            is_expert=False,
            tp_comm_buffer_name=buffer_name,
            tp_group=self.tp_group,
            **kwargs,
        )

    def _build_local_parameters(self, config, conv_bias: bool) -> None:
        """This rank's conv1d, dt_bias, A_log, D and gated norm (all split over TP along dim 0), with Megatron's
        TP attributes and, as megatron-core >= 0.18 sets them for resharding, the packed part sizes."""
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        dtype = config.params_dtype
        conv_dim = sum(self.layout.conv_sizes)  # x B C
        self.conv1d = nn.Conv1d(
            conv_dim,
            conv_dim,
            kernel_size=self.d_conv,
            groups=conv_dim,
            bias=conv_bias,
            padding=self.d_conv - 1,
            device=device,
            dtype=dtype,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=torch.float32))
        d_size = self.d_inner_local_tp if self.D_has_hdim else self.nheads_local_tp
        self.D = nn.Parameter(torch.ones(d_size, device=device, dtype=torch.float32))
        split = [self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D]
        if self.rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_inner_local_tp,
                self.d_inner_local_tp // self.ngroups_local_tp,
                eps=1e-5,
                device=device,
                dtype=dtype,
                tp_group=self.tp_group,
            )
            split.append(self.norm.weight)
        for p in split:
            if p is not None:
                setattr(p, "tensor_model_parallel", True)
                setattr(p, "partition_dim", 0)
        self.in_proj_partition_sizes = self.layout.in_proj_sizes
        self.conv1d_partition_sizes = self.layout.conv_sizes
        setattr(self.in_proj.weight, "partition_sizes", self.in_proj_partition_sizes)
        for p in (self.conv1d.weight, self.conv1d.bias):
            if p is not None:
                setattr(p, "partition_sizes", self.conv1d_partition_sizes)

    @torch.no_grad()
    def _init_tp_invariant(self, tp_rank, tp, conv_init, A_init_range, dt_min, dt_max, dt_init_floor):
        """Draw the full (all-rank) tensors from the default generator (same seed on every TP rank, as
        Megatron's CPU initialisation does) and keep this rank's shard: a model initialised at TP=n holds
        exactly the weights the same seed gives at TP=1."""
        gen = None
        x_dim, bc_dim = self.d_inner, self.ngroups * self.d_state
        bound = conv_init if conv_init is not None else 1.0 / math.sqrt(self.d_conv)  # kaiming_uniform(a=sqrt(5))
        full_w = [(torch.rand(n, self.d_conv, generator=gen) * 2 - 1) * bound for n in (x_dim, bc_dim, bc_dim)]
        full_b = [(torch.rand(n, generator=gen) * 2 - 1) / math.sqrt(self.d_conv) for n in (x_dim, bc_dim, bc_dim)]
        shard = lambda t: t.chunk(tp)[tp_rank]
        self.conv1d.weight.copy_(torch.cat([shard(w) for w in full_w]).unsqueeze(1))
        if self.conv1d.bias is not None:
            self.conv1d.bias.copy_(torch.cat([shard(b) for b in full_b]))
        dt = torch.exp(
            torch.rand(self.nheads, generator=gen) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias.copy_(shard(dt + torch.log(-torch.expm1(-dt))))  # inverse softplus
        self.A_log.copy_(shard(torch.log(torch.empty(self.nheads).uniform_(*A_init_range, generator=gen))))

    def forward(
        self, hidden_states: torch.Tensor, inference_context=None, *, inference_params=None, packed_seq_params=None
    ):
        """hidden_states: (seq, batch, d_model) -> (out (seq, batch, d_model), out_bias)."""
        if packed_seq_params is not None:
            raise NotImplementedError("megatron_elastic MambaMixer does not support packed sequences yet")
        inference_context = inference_context if inference_context is not None else inference_params
        zxBCdt, _ = self.in_proj(hidden_states)
        if inference_context is None:
            y = self.ssm(zxBCdt, self.current_view())
        else:
            y = self.ssm_cached(zxBCdt, self.current_view(), inference_context)
        return self.out_proj(y)

    def current_view(self) -> "MixerView":
        """The view the next forward pass computes (the full mixer; elastic mixers return their choice)."""
        return self.full_view()

    def ssm_cached(self, zxBCdt: torch.Tensor, v: "MixerView", inference_context) -> torch.Tensor:
        """``ssm`` with the recurrent state kept in Megatron's inference context (static batching), under
        ``key_value_memory_dict[layer_number]`` as Megatron's own mixer does: a prompt (offset 0) runs the
        chunked scan and stores the conv window and the final SSM state; later calls advance one token."""
        seq, batch, _ = zxBCdt.shape
        key = self.layer_number
        if inference_context.sequence_len_offset == 0:
            keep = getattr(inference_context, "prompt_keep", None)  # [batch, seq]: False on left padding
            if keep is not None:
                zxBCdt = zxBCdt * keep.t()[..., None].to(zxBCdt.dtype)
            y, conv_in, final = self.ssm(zxBCdt, v, return_states=True, keep=keep)
            k = v.conv_weight.shape[-1]
            conv_state = torch.nn.functional.pad(conv_in.transpose(1, 2), (max(0, k - seq), 0))[..., -k:]
            inference_context.key_value_memory_dict[key] = (conv_state.contiguous(), final)
            return y
        if seq != 1:
            raise NotImplementedError("MambaMixer decoding advances one token per call after the prompt")
        conv_state, ssm_state = inference_context.key_value_memory_dict[key]
        d_inner, bc = v.nheads * v.headdim, self.ngroups_local_tp * self.d_state
        z, xBC, dt = torch.split(zxBCdt[0], [d_inner, d_inner + 2 * bc, v.nheads], dim=-1)
        xBC = ops.causal_conv1d_step(xBC, conv_state, v.conv_weight, v.conv_bias, activation="silu")
        x, B, C = torch.split(xBC, [d_inner, bc, bc], dim=-1)
        f32 = torch.float32
        dt = torch.nn.functional.softplus(dt.to(f32) + v.dt_bias.to(f32))  # (b, h)
        A = -torch.exp(v.A_log.to(f32))
        rep = v.nheads // self.ngroups_local_tp
        Bh = (
            B.to(f32)
            .view(batch, self.ngroups_local_tp, 1, self.d_state)
            .expand(-1, -1, rep, -1)
            .reshape(batch, v.nheads, self.d_state)
        )
        Ch = (
            C.to(f32)
            .view(batch, self.ngroups_local_tp, 1, self.d_state)
            .expand(-1, -1, rep, -1)
            .reshape(batch, v.nheads, self.d_state)
        )
        xh = x.to(f32).view(batch, v.nheads, v.headdim)
        ssm_state.mul_(torch.exp(dt * A)[..., None, None]).add_((dt[..., None] * xh)[..., None] * Bh[:, :, None, :])
        y = (ssm_state * Ch[:, :, None, :]).sum(-1)
        D = v.D.to(f32).view(v.nheads, v.headdim) if self.D_has_hdim else v.D.to(f32)[:, None]
        y = y + xh * D
        if not self.rmsnorm:
            y = y * torch.nn.functional.silu(z.to(f32).view(batch, v.nheads, v.headdim))
        y = y.reshape(batch, d_inner).to(zxBCdt.dtype)
        if self.rmsnorm:
            y = ops.gated_rmsnorm(y, v.norm_weight, z, self.norm.eps, v.norm_group_size, self.norm_before_gate)
        return y.unsqueeze(0)

    def full_view(self) -> "MixerView":
        """The mixer's local parameters at full size."""
        return MixerView(
            self.nheads_local_tp,
            self.headdim,
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight if self.rmsnorm else None,
            self.d_inner_local_tp // self.ngroups_local_tp,
        )

    def ssm(self, zxBCdt: torch.Tensor, v: "MixerView", return_states: bool = False, keep=None):
        """(seq, batch, [z|x|B|C|dt] of ``v``'s sizes) -> (seq, batch, nheads*headdim): conv, SSD scan, gated norm.
        With ``return_states`` also the conv input (batch, seq, channels) and the final SSM state
        (batch, nheads, headdim, d_state). ``keep`` ([batch, seq], False on a left-padded prompt's padding, whose
        input is zero): the conv's output is zeroed there too, so padding adds nothing to the state (x = B = 0) and
        the first real token's conv window sees zeros, as at the start of a sequence."""
        seq, batch, _ = zxBCdt.shape
        d_inner, bc = v.nheads * v.headdim, self.ngroups_local_tp * self.d_state
        z, xBC, dt = torch.split(zxBCdt.transpose(0, 1), [d_inner, d_inner + 2 * bc, v.nheads], dim=-1)
        D = v.D.view(v.nheads, v.headdim) if self.D_has_hdim else v.D
        y = ops.conv_ssd_scan(
            xBC,
            v.conv_weight,
            v.conv_bias,
            dt.contiguous(),
            -torch.exp(v.A_log.float()),
            v.headdim,
            self.d_state,
            self.ngroups_local_tp,
            self.chunk_size,
            D=D,
            z=None if self.rmsnorm else z,
            dt_bias=v.dt_bias,
            return_final_states=return_states,
            keep=keep,
        )
        if return_states:
            y, final = y
        y = y.reshape(batch, seq, d_inner)
        if self.rmsnorm:
            y = ops.gated_rmsnorm(y, v.norm_weight, z, self.norm.eps, v.norm_group_size, self.norm_before_gate)
        y = foldable(y.transpose(0, 1).contiguous())  # [s, 1, d] of one sequence: see compat.foldable
        return (y, xBC, final.float()) if return_states else y

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's layout: per-head tensors and conv1d sharded on dim 0; in_proj and conv1d split into
        their ``z/x/B/C/dt`` and ``x/B/C`` parts so the checkpoint is TP-independent."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sd = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {"A_log": 0, "dt_bias": 0, "D": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            if name == "conv1d":
                sd.update(
                    make_sharded_tensors_for_checkpoint(
                        module.state_dict(prefix="", keep_vars=True),
                        f"{prefix}{name}.",
                        {"weight": 0, "bias": 0},
                        sharded_offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=metadata["dp_cp_group"],
                    )
                )
            else:
                sd.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        sd[f"{prefix}in_proj.weight"] = _split_sharded_tensor(
            sd[f"{prefix}in_proj.weight"], self.in_proj_partition_sizes, list(MambaLayout.IN_PROJ_PARTS)
        )
        for key in ("conv1d.weight", "conv1d.bias"):
            if f"{prefix}{key}" in sd:
                sd[f"{prefix}{key}"] = _split_sharded_tensor(
                    sd[f"{prefix}{key}"], self.conv1d_partition_sizes, list(MambaLayout.CONV_PARTS)
                )
        return sd

    def mamba_state_shapes_per_request(self):
        """(conv state, SSM state) shapes of one sequence on this rank, as Megatron's mixer reports them."""
        return (self.conv1d.weight.shape[0], self.d_conv), (self.nheads_local_tp, self.headdim, self.d_state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # megatron-core >= 0.18 holds the conv as parameters ``conv1d_weight``/``conv1d_bias`` (not an nn.Conv1d);
        # its plain state dicts load here under this module's names (distributed checkpoints already agree).
        for new_name, old_name in MEGATRON_CONV_PARAMETER_NAMES.items():
            if prefix + new_name in state_dict:
                state_dict[prefix + old_name] = state_dict.pop(prefix + new_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
