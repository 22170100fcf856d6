"""CPU time of our SSD scans (the chunked torch scan that training runs, and the compiled recurrence of
`ops/native.py` that every forward without a gradient runs) vs the float64 sequential recurrence, and of our whole
Mamba-2 mixer (forward, no gradient: evaluation, the frozen teacher, generation) vs, when `transformers` is
installed, its NemotronH Mamba2 mixer's torch path on the same shapes.

    python benchmarks/ssd_scan.py [--json out.json]

Prints a table (ms per forward call, median of repeats) and writes JSON. Never gates CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_elastic.ops import native, ssd_chunk_scan_torch

SHAPES = [  # (batch, seqlen, nheads, headdim, ngroups, d_state, chunk)
    (1, 256, 8, 32, 2, 32, 64),
    (2, 1024, 16, 32, 2, 64, 128),
    (1, 2048, 16, 64, 8, 128, 128),
]


def sequential_reference(x, dt, A, B, C, D):
    """Token-by-token recurrence, float64 (the semantics, not a fast path)."""
    b, l, h, p = x.shape
    g = B.shape[2]
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    dt = F.softplus(dt)
    Bh, Ch = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)
    S = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(l):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1)


def hf_nemotron_h_ssd():
    """A callable running transformers' NemotronH Mamba2 mixer torch path on the same SSD inputs, or None."""
    try:
        from transformers.models.nemotron_h import modeling_nemotron_h as m
    except Exception:
        return None
    return m


def timeit(fn, repeats):
    """Median ms of ``fn`` over ``repeats`` calls after one warm-up."""
    return interleaved([fn], repeats)[0]


def mixer_times(shape, repeats):
    """Whole Mamba-2 mixer (in_proj, conv, SSD, gated norm, out_proj) at this shape: ours (megatron_elastic
    MambaMixer, CPU path) and transformers' NemotronHMamba2Mixer forward (its torch path on CPU), timed in
    alternation. Returns (ours_ms, hf_ms|str)."""
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    b, l, h, p, g, n, chunk = shape
    d_model = h * p // 2
    initialize_parallel(1, 1)
    cfg = tiny_config(
        hybrid_pattern="M",
        hidden_size=d_model,
        mamba_num_heads=h,
        mamba_head_dim=p,
        mamba_num_groups=g,
        mamba_state_dim=n,
        mamba_chunk_size=chunk,
    )
    ours_mixer = build_hybrid_model(cfg).decoder.layers[0].mixer.eval()
    hidden = torch.randn(l, b, d_model)
    m = hf_nemotron_h_ssd()
    hf_mixer, why = None, "not installed"
    if m is not None:
        try:
            hcfg = m.NemotronHConfig(
                hidden_size=d_model,
                mamba_num_heads=h,
                mamba_head_dim=p,
                n_groups=g,
                ssm_state_size=n,
                chunk_size=chunk,
                use_mamba_kernels=False,
                hybrid_override_pattern="M",
                num_hidden_layers=1,
                vocab_size=256,
            )
            hf_mixer = m.NemotronHMamba2Mixer(hcfg, layer_idx=0).eval()
        except Exception as e:  # the API differs across transformers versions
            why = f"n/a ({type(e).__name__}: {e})"[:60]
    hh = hidden.transpose(0, 1).contiguous()
    calls = [lambda: ours_mixer(hidden)] + ([lambda: hf_mixer(hh)] if hf_mixer is not None else [])
    with torch.no_grad():
        times = interleaved(calls, repeats)
    return times[0], (times[1] if hf_mixer is not None else why)


def interleaved(calls, repeats):
    """Median ms of each callable, timed in alternation (one call of each per round) so that a machine whose speed
    drifts between runs slows them alike and their ratio holds."""
    for fn in calls:
        fn()
    ts = [[] for _ in calls]
    for _ in range(repeats):
        for t, fn in zip(ts, calls):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in ts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="benchmarks/ssd_scan.json")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    compiled = native.library() is not None
    print(
        f"{'shape (b,l,h,p,g,n,chunk)':34s} {'SSD chunked ms':>15s} {'SSD compiled ms':>16s} {'seq. fp64 ms':>13s} "
        f"{'our mixer ms':>13s} {'HF mixer ms':>12s} {'HF / ours':>10s}"
    )
    for shape in SHAPES:
        b, l, h, p, g, n, chunk = shape
        x, dt = torch.randn(b, l, h, p), torch.randn(b, l, h)
        A, B, C, D = -torch.rand(h) * 4, torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h)
        with torch.no_grad():
            ours = timeit(lambda: ssd_chunk_scan_torch(x, dt, A, B, C, chunk, D=D), args.repeats)
            fast = timeit(lambda: native.ssd_scan_forward(x, dt, A, B, C, D=D), args.repeats) if compiled else None
            seq = timeit(lambda: sequential_reference(x, dt, A, B, C, D), max(1, args.repeats // 2))
        our_mixer, hf = mixer_times(shape, args.repeats)
        rows.append(
            {
                "shape": shape,
                "ssd_chunked_ms": ours,
                "ssd_compiled_ms": fast,
                "ssd_sequential_fp64_ms": seq,
                "our_mixer_ms": our_mixer,
                "hf_nemotron_h_mixer_ms": hf,
            }
        )
        hf_s = f"{hf:.1f}" if isinstance(hf, float) else hf
        ratio = f"{hf / our_mixer:.2f}x" if isinstance(hf, float) else "-"
        fast_s = f"{fast:.1f}" if fast is not None else "not built"
        print(f"{str(shape):34s} {ours:15.1f} {fast_s:>16s} {seq:13.1f} {our_mixer:13.1f} {hf_s:>12s} {ratio:>10s}")
    with open(args.json, "w") as f:
        json.dump(
            {"threads": args.threads, "torch": torch.__version__, "compiled_kernels": compiled, "rows": rows},
            f,
            indent=2,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
