"""Batched generation speed per budget: our ElasticServer (one weight copy, every budget) against transformers'
``generate`` on each budget's Hugging Face export, at batch 1, 8 and 32, on this machine.

    python benchmarks/serving.py --run runs/demo [--batches 1 8 32] [--new-tokens 64] [--json out.json]

Prompts are held-out text of the run's data of different lengths (between half and all of --prompt-tokens, so the
batch is left-padded); greedy; every row generates exactly --new-tokens (no stop token), in both, so the tokens
counted are the same. tokens/s = batch x new tokens / median wall time of --repeats calls (prefill included),
this process's threads. Before timing, each batch's tokens from ours and from transformers are compared (greedy: they
agree unless two logits tie within float error; the count of rows that differ is printed).
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch


def _prompts(data: str, count: int, tokens: int):
    from megatron_elastic.evaluation import fixed_eval_set

    rows = [r for b in fixed_eval_set(data, tokens, count * tokens, micro_batch_size=1) for r in b["tokens"]]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(tokens // 2, tokens + 1, (count,), generator=gen).tolist()
    return [rows[i % len(rows)][:n].tolist() for i, n in enumerate(lengths)]


def _hf_generate(model, prompts, new_tokens: int, pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return out[:, width:].tolist()


def _median_time(call, repeats: int):
    """The call's result and the median wall time of ``repeats`` calls (one call is at the machine's mercy)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a finished demo run (elastic/, extracted/, data/)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="longest prompt (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--budgets", nargs="+", default=["1", "0.75", "0.5"], help="budgets (default 1 0.75 0.5)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell, the median counts (default 5)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    import transformers

    from megatron_elastic.serving.generate import ElasticServer

    run = os.path.abspath(args.run)
    server = ElasticServer.from_checkpoint(os.path.join(run, "elastic"))
    prompts = _prompts(os.path.join(run, "data"), max(args.batches), args.prompt_tokens)
    rows = []
    for budget in args.budgets:
        hf_dir = os.path.join(run, "extracted", f"budget_{budget}", "hf")
        if not os.path.isdir(hf_dir):
            raise SystemExit(f"{hf_dir} is missing: run `megatron-elastic extract` (or the demo) first")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        for batch in args.batches:
            chunk = prompts[:batch]
            server.generate_batch(chunk[:1], budget, 2)  # warm-up
            ours, t_ours = _median_time(lambda: server.generate_batch(chunk, budget, args.new_tokens), args.repeats)
            with torch.no_grad():
                _hf_generate(hf, chunk[:1], 2, 0)
                theirs, t_hf = _median_time(lambda: _hf_generate(hf, chunk, args.new_tokens, 0), args.repeats)
            row = {
                "budget": budget,
                "batch": batch,
                "ours_tokens_per_s": batch * args.new_tokens / t_ours,
                "transformers_tokens_per_s": batch * args.new_tokens / t_hf,
                "rows_that_differ": sum(a != b for a, b in zip(ours, theirs)),
            }
            row["speedup"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
            rows.append(row)
            print(
                f"budget {budget:<5} batch {batch:>3}: ours {row['ours_tokens_per_s']:8.1f} tokens/s, "
                f"transformers {row['transformers_tokens_per_s']:8.1f} ({row['speedup']:.2f}x); "
                f"rows that differ: {row['rows_that_differ']}/{batch}",
                flush=True,
            )
    head = "| budget | batch | ours (tokens/s) | transformers (tokens/s) | ours / transformers | rows that differ |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['batch']} | {r['ours_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} "
            f"| {r['speedup']:.2f}x | {r['rows_that_differ']}/{r['batch']} |"
        )
    print("\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "threads": torch.get_num_threads()}, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
