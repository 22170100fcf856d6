"""Switching budgets during generation, served from one weight copy: a small budget throughout, the large one
throughout, and switched (small for the first tokens, then large), on held-out text of the run's data.

    python benchmarks/budget_switching.py --checkpoint runs/demo/elastic --data runs/demo/data [--json out.json]

Per mode: greedy generation speed (new tokens / s over all prompts, batch 1, this process's threads), the bytes of
the KV cache and Mamba states each generation holds at its peak (measured on the inference contexts' tensors; the
one weight copy is the same for every mode and printed once), and the held-out continuation loss (teacher-forced:
the data's own continuation of each prompt, nats/token; switched = the small budget's loss on the tokens before
the switch and the large budget's, on the whole context, after it, which is what a switched generation computes;
``tests/serving/test_budget_schedule.py`` checks that equality token for token). The switch itself costs one
prefill of the prompt and the tokens so far at the large budget; its time is printed next to a decode step's.
"""

import argparse
import json
import sys
import time
import warnings

import torch


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an elastic training run (megatron-elastic train)")
    p.add_argument("--data", required=True, help="a prepare-data directory (its validation split gives the prompts)")
    p.add_argument("--small", default="0.5", help="the small budget (default 0.5)")
    p.add_argument("--large", default="1", help="the large budget (default 1)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--switch-after", type=int, default=64, help="small-budget tokens before the switch (default 64)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    if not 0 < args.switch_after < args.new_tokens:
        p.error("--switch-after must lie between 0 and --new-tokens")

    import megatron_elastic.serving.decode as decode_mod
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.evaluation import fixed_eval_set
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for
    from megatron_elastic.serving.decode import inference_cache_bytes, stream
    from megatron_elastic.serving.generate import ElasticServer

    torch.manual_seed(0)
    server = ElasticServer.from_checkpoint(args.checkpoint)
    model = server.model.eval()
    P, N, S = args.prompt_tokens, args.new_tokens, args.switch_after
    batches = fixed_eval_set(args.data, P + N, args.prompts * (P + N), micro_batch_size=1)
    rows = [r for b in batches for r in b["tokens"]][: args.prompts]
    schedules = {"small": args.small, "large": args.large, "switched": f"{args.small} for {S}, then {args.large}"}

    # Every inference context a generation opens, to measure the caches it holds.
    contexts = []
    original = decode_mod._context

    def recording(batch, max_len):
        ctx = original(batch, max_len)
        contexts.append(ctx)
        return ctx

    decode_mod._context = recording

    out = {"weights_bytes": server.resident_bytes(), "modes": {}}
    for mode, schedule in schedules.items():
        seconds, generated, peak_cache = 0.0, 0, 0
        for row in rows:
            prompt = row[:P].unsqueeze(0).long()
            contexts.clear()
            t0 = time.perf_counter()
            res = server.generate_scheduled(prompt, schedule, N)
            seconds += time.perf_counter() - t0
            generated += res.tokens.shape[1]
            # phases run one after another (each closes its context before the next opens)
            peak_cache = max([peak_cache] + [inference_cache_bytes(c) for c in contexts])
        out["modes"][mode] = {
            "schedule": schedule,
            "tokens_per_s": generated / seconds,
            "peak_cache_bytes": peak_cache,
        }
    decode_mod._context = original

    # Held-out continuation loss, teacher-forced: positions P-1 .. P+N-2 predict the data's tokens P .. P+N-1.
    nll = {}
    with torch.no_grad():
        for name in (args.small, args.large):
            losses = []
            with use_arch(model, server.arch(name)):
                for row in rows:
                    ids = row.unsqueeze(0).long()
                    logits = model(ids, position_ids_for(ids), causal_attention_mask(ids.shape[1])).float()
                    lp = torch.log_softmax(logits[0, P - 1 : P + N - 1], -1)
                    losses.append(-lp.gather(-1, row[P : P + N].long().unsqueeze(-1)).squeeze(-1))
            nll[name] = torch.stack(losses)  # [prompts, N]
    switched = torch.cat([nll[args.small][:, :S], nll[args.large][:, S:]], 1)
    for mode, value in (("small", nll[args.small]), ("large", nll[args.large]), ("switched", switched)):
        out["modes"][mode]["continuation_loss"] = float(value.mean())

    # The switch's cost: one prefill of P + S tokens at the large budget, next to one decode step there.
    ctx_ids = rows[0][: P + S].unsqueeze(0).long()
    with use_arch(model, server.arch(args.large)):
        steps = stream(model, ctx_ids, 9)
        t0 = time.perf_counter()
        next(steps)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(8):
            next(steps)
        step = (time.perf_counter() - t0) / 8
        steps.close()
    out["switch_prefill_s"], out["decode_step_s"] = prefill, step

    print(
        f"{len(rows)} held-out prompts x {P} tokens, {N} new tokens each (greedy, batch 1); switched = "
        f"{schedules['switched']!r}"
    )
    print(f"{'mode':>9} {'tokens/s':>9} {'peak caches':>12} {'continuation loss':>18}")
    for mode, r in out["modes"].items():
        cache = r["peak_cache_bytes"] / 2**20
        print(f"{mode:>9} {r['tokens_per_s']:9.1f} {cache:8.2f} MiB {r['continuation_loss']:18.4f}")
    print(f"weights (one copy, every mode): {out['weights_bytes'] / 2**20:.2f} MiB")
    print(
        f"the switch: re-prefill of {P + S} tokens at budget {args.large}: {prefill * 1e3:.1f} ms "
        f"(= {prefill / step:.1f} decode steps of {step * 1e3:.1f} ms)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
