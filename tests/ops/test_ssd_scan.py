"""The chunked SSD scan, the causal conv and the gated RMSNorm against float64 references written here,
token by token, from the Mamba-2 recurrence (forward and backward)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic import ops
from megatron_elastic.ops import conv1d


def sequential_ssd(x, dt, A, B, C, D, z, dt_bias, h0):
    """y_t = C_t . S_t + D x_t with S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, one token at a time."""
    b, l, h, p = x.shape
    g = B.shape[2]
    dt = F.softplus(dt + dt_bias)
    state = h0.clone()
    ys = []
    for t in range(l):
        new_state = []
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            inp = dt[:, t, head][:, None, None] * x[:, t, head, :, None] * B[:, t, grp, None, :]
            new_state.append(decay * state[:, head] + inp)
        state = torch.stack(new_state, dim=1)
        Ch = C[:, t].repeat_interleave(h // g, dim=1)
        y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D[:, None] * x[:, t]
        ys.append(y * F.silu(z[:, t]) if z is not None else y)
    return torch.stack(ys, dim=1), state


def _inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return dict(
        x=r(b, l, h, p),
        dt=r(b, l, h),
        A=-torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.1,
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h),
        z=r(b, l, h, p),
        dt_bias=r(h) * 0.5,
        h0=r(b, h, p, n),
    )


def _scan(t, chunk):
    """The torch scan on ``_inputs``' tensors (any of D, z, dt_bias, h0 may be None): (y, final state)."""
    return ops.ssd_chunk_scan_torch(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk,
        D=t["D"],
        z=t["z"],
        dt_bias=t["dt_bias"],
        initial_states=t["h0"],
        return_final_states=True,
    )


@pytest.mark.parametrize(
    "shape,chunk",
    [
        ((2, 16, 4, 3, 2, 5), 4),  # chunk divides length
        ((1, 23, 4, 2, 1, 3), 8),  # it does not (padding path)
        ((2, 9, 6, 4, 3, 4), 16),  # chunk longer than the sequence
        ((1, 33, 8, 2, 8, 2), 5),  # one head per group
    ],
)
def test_ssd_forward_matches_sequential_float64(shape, chunk):
    t = _inputs(*shape, torch.float64)
    y_ref, s_ref = sequential_ssd(**t)
    y, s = _scan(t, chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_ssd_float32_close_to_float64_reference():
    t = _inputs(2, 40, 4, 8, 2, 16, torch.float64, seed=3)
    y_ref, _ = sequential_ssd(**{**t, "h0": torch.zeros_like(t["h0"])})
    t32 = {k: v.float() for k, v in t.items()}
    y = ops.ssd_chunk_scan_torch(
        t32["x"], t32["dt"], t32["A"], t32["B"], t32["C"], 16, D=t32["D"], z=t32["z"], dt_bias=t32["dt_bias"]
    )
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [4, 7])
@pytest.mark.parametrize("headdim,d_state", [(2, 3), (3, 2)])  # the decays on x and y, or on B and C
def test_ssd_backward_matches_sequential_float64(chunk, headdim, d_state):
    t = _inputs(1, 13, 4, headdim, 2, d_state, torch.float64, seed=1)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"]
    for k in names:
        t[k].requires_grad_(True)
    w = torch.randn(1, 13, 4, headdim, dtype=torch.float64)
    y_ref, s_ref = sequential_ssd(**t)
    g_ref = torch.autograd.grad((y_ref * w).sum() + s_ref.sum(), [t[k] for k in names])
    y, s = _scan(t, chunk)
    g = torch.autograd.grad((y * w).sum() + s.sum(), [t[k] for k in names])
    for name, a, b in zip(names, g, g_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("chunk", [6, 11])  # chunk lengths no other test uses: the scan's masks are made here
def test_ssd_backward_after_a_pass_under_inference_mode(chunk):
    """The scan keeps its triangular masks once made; a mask first made under ``torch.inference_mode`` (evaluation)
    must still serve a later training pass, whose backward saves it."""
    t = _inputs(1, 13, 4, 2, 2, 3, torch.float64, seed=2)
    names = ["x", "dt", "B", "C"]
    with torch.inference_mode():
        ops.ssd_chunk_scan_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"])
    for k in names:
        t[k].requires_grad_(True)
    y = ops.ssd_chunk_scan_torch(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"])
    y_ref, _ = sequential_ssd(**{**t, "z": None, "h0": torch.zeros_like(t["h0"])})
    g = torch.autograd.grad(y.sum(), [t[k] for k in names])
    g_ref = torch.autograd.grad(y_ref.sum(), [t[k] for k in names])
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("chunk", [8, 64])
def test_ssd_strong_decays_in_float32_match_float64(chunk):
    """Decays far below float32's range inside a chunk (A = -16, the strongest of a Mamba's initial range, and steps
    of ~3: log decays to -48 per token): the scan keeps exp's argument inside the dtype's fast range, which must
    change neither the forward nor the gradients the float64 recurrence gives, and must not let the masked future
    (large positive arguments above the diagonal) leak in."""
    t = _inputs(1, 96, 4, 4, 2, 8, torch.float64, seed=4)
    t["A"] = torch.tensor([-16.0, -8.0, -1.0, -0.05], dtype=torch.float64)
    t["dt_bias"] = torch.full((4,), 3.0, dtype=torch.float64)
    t["z"] = None
    names = ["x", "dt", "B", "C"]
    for k in names:
        t[k].requires_grad_(True)
    y_ref, s_ref = sequential_ssd(**t)
    g_ref = torch.autograd.grad(y_ref.sum() + s_ref.sum(), [t[k] for k in names])
    t32 = {k: v.detach().float().requires_grad_(k in names) if v is not None else None for k, v in t.items()}
    y, s = _scan(t32, chunk)
    g = torch.autograd.grad(y.sum() + s.sum(), [t32[k] for k in names])
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), s_ref.detach(), rtol=1e-4, atol=1e-4)
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


def sequential_conv(x, w, bias, activation="silu"):
    b, d, l = x.shape
    width = w.shape[1]
    out = torch.zeros_like(x)
    for t in range(l):
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                out[:, :, t] += w[:, k] * x[:, :, src]
    out = out if bias is None else out + bias[:, None]
    return F.silu(out) if activation else out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("width,length", [(4, 10), (2, 3), (4, 2)])
@pytest.mark.parametrize("with_bias,activation", [(True, "silu"), (False, "silu"), (True, None)])
@pytest.mark.parametrize("block_steps", [None, 3])
def test_causal_conv1d_matches_loop(width, length, channels_last, with_bias, activation, block_steps, monkeypatch):
    """Values and gradients (the backward is written by hand) against autograd through the loop, for x contiguous
    and for x a transposed (batch, seq, dim) view (the mixer's layout, read in place), in one block of time steps
    and in blocks of 3 (taps that reach back across a block's start)."""
    if block_steps is not None:
        monkeypatch.setattr(conv1d, "_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(conv1d, "_MIN_BLOCK_STEPS", block_steps)
    if channels_last:
        x = torch.randn(2, length, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(2, 6, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if with_bias else None
    ref = sequential_conv(x, w, bias, activation)
    out = ops.causal_conv1d_torch(x, w, bias, activation)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():  # no gradient wanted: the activation is applied in place
        torch.testing.assert_close(ops.causal_conv1d_torch(x, w, bias, activation), ref)
    params = [x, w] + ([bias] if with_bias else [])
    gr = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref).sin()).sum(), params)
    go = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), params)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b)


def test_conv_step_matches_full_conv():
    x = torch.randn(2, 5, 9, dtype=torch.float64)
    w, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    full = ops.causal_conv1d_torch(x, w, bias)
    state = torch.zeros(2, 5, 4, dtype=torch.float64)
    steps = torch.stack([ops.causal_conv1d_step(x[:, :, t], state, w, bias) for t in range(9)], dim=-1)
    torch.testing.assert_close(steps, full)


@pytest.mark.parametrize("group_size", [12, 4, 3])
def test_gated_rmsnorm_matches_per_group_formula(group_size):
    """Values and gradients (x, z, weight) against autograd through the formula written out group by group."""
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    out = ops.gated_rmsnorm_torch(x, w, z, eps=1e-5, group_size=group_size)
    gated = x * z * torch.sigmoid(z)
    ref = torch.empty_like(gated)
    for s in range(0, 12, group_size):
        blk = gated[..., s : s + group_size]
        ref[..., s : s + group_size] = blk / torch.sqrt((blk**2).mean(-1, keepdim=True) + 1e-5)
    ref = ref * w
    torch.testing.assert_close(out, ref)
    weights = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), [x, z, w])
    want = torch.autograd.grad((ref * weights).sum(), [x, z, w])
    for name, a, b in zip("xzw", got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad {name}: {m}")
    with pytest.raises(ValueError, match="group_size"):
        ops.gated_rmsnorm_torch(x, w, z, group_size=5)


def test_the_cpu_dispatch_runs_its_own_chunk_length_and_gives_the_same_result():
    """The chunk length is a blocking choice: the dispatcher's CPU chunk (here 32, not the 8 asked for) gives the
    float64 recurrence's result, and so does the torch scan at the chunk asked for."""
    t = _inputs(2, 70, 4, 32, 2, 32, torch.float64, seed=4)
    assert ops.ssd.cpu_chunk_size(32, 32) == 32 and ops.ssd.cpu_chunk_size(64, 128) == 64
    assert ops.ssd.cpu_chunk_size(8, 8) == 16
    y_ref, s_ref = sequential_ssd(**t)
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=t["h0"], return_final_states=True)
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    for y, s in (ops.ssd_chunk_scan(*args, 8, **kw), ops.ssd_chunk_scan_torch(*args, 8, **kw)):
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
