"""The compiled CPU kernels (``ops.native``: the SSD recurrence, the causal conv, the two fused) against the float64
references of test_ssd_scan.py, written token by token from the Mamba-2 recurrence; their dispatch (no gradient
wanted, CPU, not float64), the build cache, and the switch ``MEGATRON_ELASTIC_CPU_KERNELS``."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic import ops
from megatron_elastic.errors import ConfigError
from megatron_elastic.ops import native

from .test_ssd_scan import _inputs, sequential_conv, sequential_ssd

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the kernels cannot be built")


@pytest.fixture
def fresh_load(monkeypatch):
    """Forget the loaded library (and the warnings given) for this test, and again after it."""
    native._load.cache_clear()
    native._warn_once.cache_clear()
    yield
    native._load.cache_clear()
    native._warn_once.cache_clear()


def _close(got, want, name=""):
    """float32 against float64: within 1e-4 of the reference's largest magnitude (and 1e-4 relative)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


SHAPES = [  # (b, l, h, p, g, n): odd lengths (one step left of a pair), a block of 64 steps and one step past it,
    # head widths below, at and across a vector of 16 (80: the 12B parent's), one head per group and one group
    (2, 13, 4, 3, 2, 5),
    (1, 65, 4, 16, 1, 16),
    (2, 130, 6, 20, 3, 7),
    (1, 64, 2, 80, 1, 128),
    (1, 1, 8, 64, 8, 1),
    (3, 31, 4, 33, 4, 9),
]


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_the_compiled_scan_matches_the_float64_recurrence(shape, threads):
    """y and the final state, with every optional input (D per head, z, dt_bias, an initial state), in float32 from
    inputs whose float64 values the reference uses; on one thread and split over three."""
    t = _inputs(*shape, torch.float64, seed=sum(shape))
    y_ref, s_ref = sequential_ssd(**t)
    t32 = {k: v.float() for k, v in t.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, s = native.ssd_scan_forward(
            t32["x"], t32["dt"], t32["A"], t32["B"], t32["C"], D=t32["D"], z=t32["z"], dt_bias=t32["dt_bias"],
            initial_states=t32["h0"], return_final_states=True,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert y.dtype == torch.float32 and y.shape == t["x"].shape
    _close(y, y_ref, "y")
    _close(s, s_ref, "final state")


@needs_compiler
def test_the_compiled_scan_without_optional_inputs_and_with_per_channel_d_and_a_step_limit():
    """No z, no dt_bias, no initial state, D per channel, dt without softplus clamped to a limit (the torch scan in
    float64 is the reference: its semantics of these options)."""
    t = _inputs(2, 40, 4, 24, 2, 16, torch.float64, seed=7)
    D = torch.randn(4, 24, dtype=torch.float64)
    dt = t["dt"].abs()
    want = ops.ssd_chunk_scan_torch(t["x"], dt, t["A"], t["B"], t["C"], 8, D=D, dt_softplus=False, dt_limit=(0.2, 0.9))
    got = native.ssd_scan_forward(
        t["x"].float(), dt.float(), t["A"].float(), t["B"].float(), t["C"].float(), D=D.float(), dt_softplus=False,
        dt_limit=(0.2, 0.9),
    )  # fmt: skip
    _close(got, want)


@needs_compiler
def test_the_compiled_scan_reads_strided_and_bfloat16_inputs():
    """x, B, C as slices of one packed (batch, seq, channels) tensor (the mixer's layout, read in place) and dt a
    strided slice; then the same values in bfloat16 (converted on the way in, y returned in bfloat16)."""
    b, l, h, p, g, n = 2, 37, 4, 16, 2, 8
    packed = torch.randn(b, l, h * p + 2 * g * n + h + 5)
    x = packed[..., : h * p].view(b, l, h, p)
    B = packed[..., h * p : h * p + g * n].view(b, l, g, n)
    C = packed[..., h * p + g * n : h * p + 2 * g * n].view(b, l, g, n)
    dt = packed[..., h * p + 2 * g * n : h * p + 2 * g * n + h]
    A, D = -torch.rand(h) - 0.1, torch.randn(h)
    assert not x.is_contiguous() and not dt.is_contiguous()
    want, _ = sequential_ssd(
        *(v.double() for v in (x, dt, A, B, C, D)), None, torch.zeros(h, dtype=torch.float64),
        torch.zeros(b, h, p, n, dtype=torch.float64),
    )  # fmt: skip
    _close(native.ssd_scan_forward(x, dt, A, B, C, D=D), want, "strided")
    bf = [v.bfloat16() for v in (x, dt, B, C)]
    want_bf, _ = sequential_ssd(
        bf[0].double(), bf[1].double(), A.double(), bf[2].double(), bf[3].double(), D.double(), None,
        torch.zeros(h, dtype=torch.float64), torch.zeros(b, h, p, n, dtype=torch.float64),
    )  # fmt: skip
    got = native.ssd_scan_forward(bf[0], bf[1], A, bf[2], bf[3], D=D)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want_bf, rtol=2e-2, atol=2e-2 * want_bf.abs().max().item())


@needs_compiler
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 4, 3, 2, 5), (1, 130, 4, 20, 1, 17), (1, 70, 8, 16, 2, 16)])
def test_the_fused_conv_and_scan_match_the_float64_conv_then_recurrence(shape, with_bias):
    """``ops.conv_ssd_scan`` with no gradient wanted runs the conv inside the compiled scan: against the float64
    conv loop then the float64 recurrence, and against the unfused torch path (the same call with a gradient
    wanted)."""
    b, l, h, p, g, n = shape
    gen = torch.Generator().manual_seed(l)
    channels = h * p + 2 * g * n
    xBC = torch.randn(b, l, channels, generator=gen)
    w, bias = torch.randn(channels, 4, generator=gen) * 0.5, torch.randn(channels, generator=gen) if with_bias else None
    dt, A = torch.randn(b, l, h, generator=gen), -torch.rand(h, generator=gen) - 0.1
    D, dt_bias, z = (
        torch.randn(h, generator=gen),
        torch.randn(h, generator=gen),
        torch.randn(b, l, h * p, generator=gen),
    )

    conv = sequential_conv(xBC.double().transpose(1, 2), w.double(), None if bias is None else bias.double())
    x, B, C = torch.split(conv.transpose(1, 2), [h * p, g * n, g * n], dim=-1)
    y_ref, s_ref = sequential_ssd(
        x.reshape(b, l, h, p), dt.double(), A.double(), B.reshape(b, l, g, n), C.reshape(b, l, g, n), D.double(),
        z.double().view(b, l, h, p), dt_bias.double(), torch.zeros(b, h, p, n, dtype=torch.float64),
    )  # fmt: skip
    kw = dict(D=D, z=z, dt_bias=dt_bias, return_final_states=True)
    with torch.no_grad():
        y, s = ops.conv_ssd_scan(xBC, w, bias, dt, A, p, n, g, 16, **kw)
    _close(y, y_ref, "y")
    _close(s, s_ref, "final state")
    wg = w.clone().requires_grad_()  # a gradient wanted: the torch path
    y_torch, _ = ops.conv_ssd_scan(xBC, wg, bias, dt, A, p, n, g, 16, **kw)
    assert y_torch.requires_grad
    _close(y, y_torch.detach().double(), "torch path")


@needs_compiler
@pytest.mark.parametrize("with_bias,activation", [(True, "silu"), (False, None)])
def test_the_compiled_conv_matches_the_loop(with_bias, activation):
    """The dispatcher's conv with no gradient wanted (the compiled loop), on a transposed (batch, seq, dim) view, long
    enough to be split over threads."""
    x = torch.randn(2, 300, 70).transpose(1, 2)
    w, bias = torch.randn(70, 4), torch.randn(70) if with_bias else None
    want = sequential_conv(x.double(), w.double(), None if bias is None else bias.double(), activation)
    assert native.usable(x, w, bias)
    got = ops.causal_conv1d(x, w, bias, activation)
    assert got.shape == want.shape
    _close(got, want)


@needs_compiler
def test_silu_of_extreme_arguments():
    """The kernels' own exp (a polynomial, vectorised) inside silu: large positive and negative pre-activations,
    against torch's silu."""
    x = torch.tensor([-200.0, -90.0, -87.5, -30.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 88.5, 200.0]).view(1, 1, -1)
    one = torch.ones(x.shape[1], 1)
    got = native.causal_conv1d_forward(x.transpose(1, 2).contiguous().transpose(1, 2), one, None, silu=True)
    torch.testing.assert_close(got, F.silu(x), rtol=1e-6, atol=1e-30)


@needs_compiler
def test_the_dispatch_takes_the_compiled_scan_only_where_no_gradient_is_wanted(monkeypatch):
    t = _inputs(1, 20, 4, 8, 2, 4, torch.float32, seed=5)
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    calls = []
    real = native.ssd_scan_forward
    monkeypatch.setattr(native, "ssd_scan_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fast = ops.ssd_chunk_scan(*args, 8, D=t["D"], dt_bias=t["dt_bias"])
    assert calls == [1]
    t["x"].requires_grad_()
    slow = ops.ssd_chunk_scan(*args, 8, D=t["D"], dt_bias=t["dt_bias"])  # a gradient wanted: the torch scan
    assert calls == [1] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # float64 stays on the torch path (the reference precision)
        ops.ssd_chunk_scan(*(a.double() for a in args), 8)
    assert calls == [1]


def test_the_switch_turns_the_kernels_off_and_names_its_values(monkeypatch, fresh_load):
    monkeypatch.setenv(native.ENV, "torch")
    assert native.library() is None and not native.usable(torch.ones(2))
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ConfigError, match="auto, native, torch"):
        native.library()


def test_without_a_compiler_auto_warns_once_and_native_refuses(monkeypatch, tmp_path, fresh_load):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setenv("MEGATRON_ELASTIC_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library() is None and native.library() is None
        t = _inputs(1, 9, 2, 4, 1, 3, torch.float32)
        with torch.no_grad():  # still computes, on the torch path
            y = ops.ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    assert y.shape == t["x"].shape
    assert [str(w.message) for w in caught if "C compiler" in str(w.message)].__len__() == 1
    monkeypatch.setenv(native.ENV, "native")
    with pytest.raises(ConfigError, match="install a C compiler"):
        native.library()


@needs_compiler
def test_the_build_is_cached_per_source_and_a_failing_compiler_is_reported(tmp_path):
    cc = native.compiler()
    first = native.build(cc, tmp_path / "cache")
    assert first.exists() and native.build(cc, tmp_path / "cache") == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary left behind
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: fatal error: no' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="fatal error"):
        native.build(str(bad), tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.tmp"))


@needs_compiler
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_the_compiled_gated_norm_matches_the_float64_formula(group_size, norm_before_gate, gated):
    """The dispatcher's gated RMSNorm with no gradient wanted (the compiled pass), on (batch, seq, d) slices of a
    (seq, batch, channels) tensor as the mixer hands it, against the torch formula in float64; and in bfloat16."""
    packed = torch.randn(7, 3, 2 * 24 + 5)
    x, z = packed.transpose(0, 1)[..., :24], packed.transpose(0, 1)[..., 24:48]
    w = torch.randn(24)
    zz = z if gated else None
    want = ops.gated_rmsnorm_torch(x.double(), w.double(), None if zz is None else zz.double(), 1e-5, group_size,
                                   norm_before_gate)  # fmt: skip
    assert native.usable(x, w, zz)
    got = ops.gated_rmsnorm(x, w, zz, 1e-5, group_size, norm_before_gate)
    assert got.shape == x.shape and got.dtype == torch.float32
    _close(got, want)
    got_bf = ops.gated_rmsnorm(x.bfloat16(), w, None if zz is None else zz.bfloat16(), 1e-5, group_size,
                               norm_before_gate)  # fmt: skip
    want_bf = ops.gated_rmsnorm_torch(x.bfloat16(), w, None if zz is None else zz.bfloat16(), 1e-5, group_size,
                                      norm_before_gate)  # fmt: skip
    assert got_bf.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf, want_bf, rtol=1.6e-2, atol=1e-2)
    with pytest.raises(ValueError, match="group_size"):
        native.gated_rmsnorm_forward(x, w, zz, group_size=5)
