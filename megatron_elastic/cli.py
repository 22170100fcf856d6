"""``megatron-elastic``: the command-line entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings

from megatron_elastic.data.corpus import DEFAULT_MAX_BYTES
from megatron_elastic.demo import PRECISIONS, recipe_path  # noqa: F401  (recipe_path: used by tests)


def _quiet_warnings() -> None:
    # A CUDA build of torch on a machine without CUDA logs this when Megatron imports cpp_extension.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)


def cmd_prepare_data(args) -> int:
    from megatron_elastic.data.prepare import prepare_data

    prepare_data(
        args.out,
        args.input,
        args.json_key,
        args.tokenizer,
        args.max_bytes,
        args.valid_every,
        progress=not args.no_progress,
        workers=args.workers,
    )
    return 0


def _pretrain_config(args):
    from megatron_elastic.store.job_config import load_pretrain_config

    overrides = list(args.set or [])
    return load_pretrain_config(args.config, overrides)


def cmd_pretrain(args) -> int:
    from megatron_elastic.training.pretrain import pretrain

    cfg = _pretrain_config(args)
    summary = pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    if summary and int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_importance(args) -> int:
    from megatron_elastic.importance.run import run_importance

    options = ("mamba_source", "micro_batch_size", "seq_length", "tensor_parallel", "save_every_minutes")
    res = run_importance(
        args.checkpoint,
        args.data,
        args.out,
        args.calib_tokens,
        args.ffn_source,
        args.iterative_depth,
        progress=not args.no_progress,
        mamba_head_channels=args.mamba_head_channels,
        **{name: getattr(args, name) for name in options},
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(res["table"])
    print(f"depth ranking (most important first): {res['depth_ranking']}")
    print(f"sorted checkpoint: {res['sorted_checkpoint']}")
    print(f"plot: {res['plot'] or 'not written (pip install matplotlib)'}")
    return 0


def budget_overrides(budgets) -> list:
    """``train --budget X --budget Y`` as the config override ``budgets=[X, Y]`` (each kept as written)."""
    return [f"budgets={json.dumps([str(b) for b in budgets])}"] if budgets else []


def cmd_train(args) -> int:
    # The stop handlers go in before torch and Megatron are imported: a preemption during start-up is kept.
    from megatron_elastic.training.preemption import REQUEUE_EXIT_CODE, StopSignals, mark_for_requeue

    with StopSignals() as signals:
        from megatron_elastic.elastic.config import load_elastic_config
        from megatron_elastic.elastic.run import train_elastic
        from megatron_elastic.store.checkpoint import latest_checkpoint

        cfg = load_elastic_config(args.config, list(args.set or []) + budget_overrides(args.budget))
        latest = latest_checkpoint(cfg.checkpoint.dir) if os.path.isdir(cfg.checkpoint.dir) else None
        if latest is not None and not (args.resume or args.auto_resume):
            from megatron_elastic.errors import ConfigError

            raise ConfigError(
                f"checkpoint.dir {cfg.checkpoint.dir} already holds a run ({latest}); "
                "pass --resume to continue it, or --set checkpoint.dir=NEW_DIR to start another"
            )
        resume = args.resume or (args.auto_resume and latest is not None)
        summary = train_elastic(
            cfg, resume=resume, progress=not args.no_progress, until_stage=args.until_stage, signals=signals
        )
    from megatron_elastic.elastic.report import results_table

    if summary.get("stopped") in ("preempted", "time_limit"):
        mark_for_requeue()
        return REQUEUE_EXIT_CODE
    if summary.get("stopped"):
        return 0
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(results_table(summary))
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


def cmd_extract(args) -> int:
    from megatron_elastic.elastic.budget import format_costs
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.extraction.hf_elastic import export_hf_elastic

    if args.arch and args.budget:
        raise ConfigError("give --budget or --arch, not both")
    if args.format == "hf-elastic":
        if args.arch:
            raise ConfigError("--format hf-elastic lists the router's budgets: give --budget, not --arch")
        rows = export_hf_elastic(args.checkpoint, args.out, args.budget, args.table_step)
    else:
        budgets = args.budget or (None if args.arch else ["all"])
        rows = extract(args.checkpoint, args.out, budgets=budgets, arch_file=args.arch, fmt=args.format)
    head = f"{'sub-model':>14} {'parameters':>12} {'fraction':>8} {'memory':>18} {'FLOPs/token':>18} {'trained':>7}"
    print(f"{head}  outputs")
    for r in rows:
        outs = ", ".join(r[k] for k in ("megatron", "hf", "hf-elastic") if k in r)
        trained = {True: "yes", False: "no"}.get(r.get("trained"), "-")
        memory, flops = format_costs(r["costs"])
        size = f"{r['parameters']:>12,} {r['fraction']:>8.3f} {memory:>18} {flops:>18}"
        print(f"{r['name']:>14} {size} {trained:>7}  {outs}")
    if rows and "tokenizer" in rows[0]:
        print(f"tokenizer in the Hugging Face exports: {rows[0]['tokenizer']}")
    return 0


def cmd_import_hf(args) -> int:
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.extraction.import_hf import import_hf
    from megatron_elastic.store.job_config import apply_overrides, read_config_mapping

    if args.config and args.data:
        raise ConfigError("import-hf: give --data (a prepare-data directory) or --config (its data section), not both")
    job_config = apply_overrides(read_config_mapping(args.config), list(args.set or [])) if args.config else {}
    data = job_config.get("data") or {} if args.config else {"path": args.data or "runs/data"}
    res = import_hf(args.hf_dir, args.out, data=data, job_config=job_config)
    print(f"imported {res['parameters']:,} parameters ({res['hybrid_pattern']}) -> {res['checkpoint']}")
    print(f"data: {res['data']}")
    print(f"next: megatron-elastic importance --checkpoint {args.out} --out <dir>")
    return 0


def cmd_evaluate(args) -> int:
    from megatron_elastic.harness import evaluate_budgets, parse_tasks, results_table

    budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    table = evaluate_budgets(
        args.checkpoint,
        parse_tasks(args.tasks),
        budgets,
        args.out,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    print(results_table(table))
    print(f"lm-eval's results per budget: {args.out}/lm_eval_budget_<budget>.json")
    return 0


def cmd_generate(args) -> int:
    import torch

    from megatron_elastic.data.tokenizer import decode_text, load_tokenizer
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.budget import describe_costs, every_cost, report_shape, stated_costs
    from megatron_elastic.serving.generate import ElasticServer

    server = ElasticServer.from_checkpoint(args.checkpoint)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else server.tokenizer()
    prompt = torch.tensor([tok.tokenize(args.prompt)], dtype=torch.long)
    if args.budget_schedule:
        out = server.generate_scheduled(
            prompt,
            args.budget_schedule,
            args.max_new_tokens,
            tokenize=tok.tokenize,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=torch.Generator().manual_seed(args.seed),
        )
        ids = out.tokens[0].tolist()
        ends = [at for at, _ in out.switches[1:]] + [len(ids)]
        for (at, budget), end in zip(out.switches, ends):
            print(f"--- budget {budget} (tokens {at}-{end}):\n{decode_text(tok, ids[at:end])}")
        print(f"--- all:\n{args.prompt}{decode_text(tok, ids)}")
        return 0
    budgets = sorted(server.archs, key=float, reverse=True) if args.budget == "all" else [args.budget]
    full = ElasticArch.full(server.model.config)
    kinds = [server.router.cost] if server.router is not None else []
    for b in budgets:
        arch = server.arch(b)
        shape = report_shape([*stated_costs(b), *kinds], prompt.shape[1] + args.max_new_tokens)
        costs, ref = every_cost(server.model.config, arch, *shape), every_cost(server.model.config, full, *shape)
        print(f"budget {b}: {describe_costs(costs)} ({costs['params'] / ref['params']:.3f} of the parent's parameters)")
        out = server.generate(
            prompt,
            b,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=torch.Generator().manual_seed(args.seed),
        )
        print(f"--- budget {b}:\n{args.prompt}{decode_text(tok, out[0].tolist())}")
    return 0


def cmd_plan(args) -> int:
    from megatron_elastic.plan import Hardware, dump_yaml, format_plan, make_plan

    hw = Hardware(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hardware)})
    importance = (args.calib_tokens, args.importance_seq_length, args.importance_micro_batch_size)
    plan = make_plan(
        args.config, hw, list(args.set or []), kernels=args.kernels, extra_budgets=args.budget, importance=importance
    )
    print(dump_yaml(plan) if args.yaml else format_plan(plan, hw))
    return 0


def cmd_demo(args) -> int:
    """The tiny end-to-end recipe on this machine's CPU, with a report (see megatron_elastic/demo.py)."""
    from megatron_elastic.demo import run_demo

    run_demo(args)
    return 0


def _config_args(p, example: str, set_help: str = "override a config value (repeatable)") -> None:
    p.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help=set_help)


def _no_progress_arg(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prepare_data_args(p) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", nargs="+", help="JSONL files (one object per line, text under --json-key) or text files")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (default) or a tokenizer on disk: a Hugging Face tokenizer directory (tokenizer.json), a "
        "SentencePiece .model file, or a directory with Megatron's tokenizer_metadata.json; read offline and copied "
        "into --out",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on built-in corpus size (default 16 MB)"
    )
    p.add_argument("--valid-every", type=int, default=20, help="every N-th document goes to valid (default 20)")
    _no_progress_arg(p)


def _pretrain_args(p) -> None:
    _config_args(p, "megatron_elastic/recipes/tiny_parent.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    _no_progress_arg(p)


def _importance_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a pretrain checkpoint directory (or its parent with 'latest')")
    p.add_argument("--data", help="prepared data directory (default: the one the checkpoint was trained on)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib-tokens", type=int, default=262_144, help="calibration tokens (default 262144)")
    p.add_argument(
        "--ffn-source",
        choices=["fc2_input", "fc1_output"],
        default="fc2_input",
        help="FFN activation scored: after the activation (ModelOpt) or fc1's output (paper)",
    )
    p.add_argument(
        "--mamba-source",
        choices=["x", "out_proj_input"],
        default="x",
        help="Mamba activation scored: in_proj's x part (paper, ModelOpt) or the gated-norm output",
    )
    p.add_argument(
        "--mamba-head-channels",
        type=int,
        default=0,
        metavar="K",
        help="score each Mamba head over its K top-ranked channels (D_top, paper Eq. 4; e.g. the smallest head dim "
        "the elastic space keeps); default 0: all channels",
    )
    p.add_argument("--iterative-depth", action="store_true", help="greedy: remove the least important layer, re-score")
    p.add_argument(
        "--micro-batch-size", type=int, help="calibration samples per forward pass (default: the job's train section)"
    )
    p.add_argument("--seq-length", type=int, help="calibration sequence length (default: the job's data.seq_length)")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        help="TP size (default: the job's parallel section); the processes launched (torchrun/srun) / TP are the "
        "data-parallel ranks that split the calibration set",
    )
    p.add_argument(
        "--save-every-minutes",
        type=float,
        default=10.0,
        help="save the running sums under OUT/progress this often (default 10; 0: after every batch); the same "
        "command resumes a killed job",
    )
    _no_progress_arg(p)


def _train_args(p) -> None:
    _config_args(
        p,
        "megatron_elastic/recipes/tiny_elastic.yaml",
        "override a config value (repeatable), e.g. parent=runs/demo/importance",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    p.add_argument(
        "--budget",
        action="append",
        metavar="BUDGET",
        help="train this budget (repeatable; replaces the config's budgets, largest first, the parent is 1.0): a "
        "parameter fraction (0.5) or, stated in memory or FLOPs, e.g. 18GiB@32768x8 (sets budget_kind); the "
        "curriculum's budget_weights must list one weight per budget",
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when checkpoint.dir has a checkpoint, else start fresh (for (re)queued cluster jobs)",
    )
    p.add_argument(
        "--until-stage",
        type=int,
        metavar="K",
        help="stop with a checkpoint once curriculum stage K (1-based) is done: one job per stage",
    )
    _no_progress_arg(p)


def _extract_args(p) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="an elastic training run (or its iter_* directory); with --arch also a pretrain or sorted checkpoint",
    )
    p.add_argument(
        "--budget",
        action="append",
        help="a budget: a fraction, trained (e.g. 0.5) or any value between the smallest trained budget and 1 "
        "(chosen zero-shot between its trained neighbours, marked trained=false in arch.json); memory at a context "
        "[x batch] (6GiB@32768x4) or FLOPs per token (1.5GFLOP@4096): the largest sub-model within it; or 'all' "
        "trained ones (repeatable; default all)",
    )
    p.add_argument("--arch", help="an architecture JSON (ElasticArch.to_json) instead of the router's choice")
    p.add_argument(
        "--format",
        choices=["megatron", "hf", "both", "vllm", "hf-elastic"],
        default="both",
        help="what to write (default both): a Megatron and/or Hugging Face checkpoint per budget; 'vllm': NemotronH "
        "as vLLM loads it (per-MLP intermediate_size list; needs Mamba and attention sizes shared by all layers: "
        "space.heterogeneous: [ffn]); or 'hf-elastic': one Hugging Face directory with the full weights and every "
        "budget (the requested ones and the router's choice every 0.05), sliced at load time by its remote code",
    )
    p.add_argument(
        "--table-step",
        type=float,
        default=0.05,
        help="hf-elastic: also list the router's choice every this much of the budget (default 0.05)",
    )
    p.add_argument("--out", required=True, help="output directory")


def _import_hf_args(p) -> None:
    p.add_argument("--hf-dir", required=True, help="local Hugging Face checkpoint directory (no downloads)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--data", help="a prepare-data directory the checkpoint's job points at (default runs/data)")
    p.add_argument(
        "--config",
        help="a job YAML (e.g. examples/nemotron_nano_v2_12b/parent.yaml) whose data, train and parallel sections and "
        "model.elastic_ffn_groups the checkpoint's job takes (what importance runs with); a blend without "
        "data.tokenizer uses the tokenizer inside --hf-dir",
    )
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a field of --config")


def _generate_args(p) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="an elastic training run (or a pretrain/sorted checkpoint: full model)"
    )
    p.add_argument(
        "--budget",
        default="1",
        help="a budget: a fraction (a trained one, or any value between the smallest trained budget and 1: chosen "
        "zero-shot between its trained neighbours), memory at a context [x batch] (6GiB@32768) or FLOPs per token "
        "(1.5GFLOP@4096), or 'all' trained ones (default 1)",
    )
    p.add_argument(
        "--budget-schedule",
        metavar="SCHEDULE",
        help="switch budgets during the generation (one weight copy; each switch re-prefills the context at the new "
        "budget), e.g. '0.5 until </think>, then 1.0' or '0.5 for 128, then 1'; replaces --budget",
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--tokenizer",
        help="'byte' or a tokenizer directory/file (default: the one the checkpoint's training data was written with)",
    )


def _evaluate_args(p) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="an elastic training run (or a pretrain/sorted checkpoint: full model)"
    )
    p.add_argument("--tasks", required=True, help="lm-eval task names separated by commas (e.g. arc_easy,hellaswag)")
    p.add_argument(
        "--budget",
        default="all",
        help="'all' trained budgets (default), or budgets separated by commas: fractions (any between the smallest "
        "trained one and 1), memory (6GiB@32768) or FLOPs per token (1.5GFLOP@4096)",
    )
    p.add_argument(
        "--out", required=True, help="output folder: lm_eval.md (budget x task) and lm-eval's JSON per budget"
    )
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAML files (local data sets)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, help="documents per task (or a fraction of them): a quick look, not a score")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward when scoring (default 8)")


def _plan_args(p) -> None:
    _config_args(p, "examples/nemotron_nano_v2_12b/elastic.yaml")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80, H100 SXM)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak per GPU (default 989, H100 SXM)")
    p.add_argument(
        "--mfu",
        type=float,
        default=0.35,
        help="assumed share of peak FLOPs achieved on the work done, recompute's extra forward included (default 0.35)",
    )
    p.add_argument("--overhead-gib", type=float, default=4.0, help="per-GPU allowance for context/NCCL/fragmentation")
    p.add_argument(
        "--checkpoint-write-gbps",
        type=float,
        default=1.0,
        help="GB/s one node writes to the checkpoint file system (default 1.0; benchmarks/checkpoint_io.py measures "
        "it): sizes the stop checkpoint's time and the Slurm GraceTime/KillWait/--signal it needs",
    )
    p.add_argument(
        "--budget",
        action="append",
        metavar="BUDGET",
        help="also size this budget (not trained): a parameter fraction (0.6), memory at a context [x batch] "
        "(24GiB@32768x8) or FLOPs per token (20GFLOP@4096); repeatable",
    )
    from megatron_elastic.model.kernels import MACHINES

    p.add_argument(
        "--kernels",
        choices=list(MACHINES),
        default="fused",
        help="the training GPUs' packages: 'fused' (mamba_ssm, causal_conv1d, TransformerEngine: the Docker image) "
        "or 'reference' (none: the pure-PyTorch Mamba path); attention is SDPA either way (default: %(default)s)",
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=1024 * 8192,
        help="importance: calibration tokens (default 8388608: the paper's 1024 samples x 8192)",
    )
    p.add_argument("--importance-seq-length", type=int, default=8192, help="importance: sequence length (8192)")
    p.add_argument("--importance-micro-batch-size", type=int, default=1, help="importance: micro-batch size (1)")
    p.add_argument("--yaml", action="store_true", help="print the plan as YAML")


def _demo_args(p) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a short run (a few minutes) to check the set-up")
    p.add_argument("--config", help="parent config (default: the packaged tiny recipe)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config value")
    p.add_argument(
        "--elastic-set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override a value of the elastic recipe (recipes/tiny_elastic.yaml)",
    )
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="built-in corpus size cap")
    p.add_argument(
        "--seed",
        type=int,
        help="seed of every phase (pretraining data order and init, calibration, the elastic run); default: the "
        "recipes' (1234). The report compares its numbers with the spread of the recipe over several seeds.",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="float32, or bfloat16 (Megatron's mixed precision: 2-3.5x faster products where the CPU multiplies "
        "bf16 in hardware, ~0.01 bits/byte higher); default auto: bfloat16 on a CPU with avx512_bf16 or amx_bf16 "
        "(or a bf16 GPU), else float32. Each has its own spread over seeds in the report.",
    )
    _no_progress_arg(p)


# (name, one-line help, description, arguments, handler): the subcommands in pipeline order.
SUBCOMMANDS = [
    (
        "prepare-data",
        "write Megatron indexed datasets (.bin/.idx), train and valid splits",
        "Tokenise text into Megatron indexed datasets. Without --input, uses the built-in corpus: this machine's "
        "Python standard library sources.",
        _prepare_data_args,
        cmd_prepare_data,
    ),
    (
        "pretrain",
        "pretrain a hybrid parent model",
        "Pretrain a hybrid parent from a YAML config (sections model, parallel, data, train, checkpoint). Launch "
        "with torchrun for TP/PP/DP > 1.",
        _pretrain_args,
        cmd_pretrain,
    ),
    (
        "importance",
        "score a trained parent, sort it so every budget is a prefix",
        "Activation-based width importance and normalized-MSE depth importance on calibration data, then the "
        "function-preserving sort. Writes scores.json, ranking.json, summary.txt, importance.png and a sorted "
        "checkpoint in --out.",
        _importance_args,
        cmd_importance,
    ),
    (
        "train",
        "elastic distillation: train every budget of a sorted parent at once",
        "Router + frozen-teacher KD over the two-stage curriculum, from the output of `importance`. YAML "
        "sections: parent, budgets, space, router, distill, curriculum, parallel, data, train, checkpoint; "
        "optional fixed_arch (an arch.json: train only that sub-model, the exact baseline). "
        "Launch with torchrun for TP/PP/DP > 1. SIGTERM/SIGUSR1 checkpoint and exit with code 99 (requeue me).",
        _train_args,
        cmd_train,
    ),
    (
        "extract",
        "slice any budget into standalone Megatron and Hugging Face checkpoints",
        "Zero-shot extraction: the router's (nested) choice for each budget (trained, or any fraction between the "
        "smallest trained budget and 1), or an explicit architecture JSON, "
        "sliced out of the elastic weights. Writes <out>/budget_<b>/{megatron,hf,arch.json}: a "
        "dist_checkpointing checkpoint of a plain hybrid model (loads at any TP/PP) and a NemotronH checkpoint "
        "transformers loads.",
        _extract_args,
        cmd_extract,
    ),
    (
        "import-hf",
        "convert a Hugging Face NemotronH checkpoint into a Megatron checkpoint",
        "Start the pipeline from a released parent: a local NemotronH checkpoint (config.json + safetensors, "
        "e.g. Nemotron Nano V2's format) becomes a dist_checkpointing checkpoint of our hybrid model. Mamba-2, "
        "attention and MLP layers; MoE is refused.",
        _import_hf_args,
        cmd_import_hf,
    ),
    (
        "generate",
        "decode with any trained budget, served from one copy of the weights",
        "Load an elastic checkpoint once and decode a prompt with one budget's sub-model (or every budget), "
        "keeping the recurrent Mamba state and the attention KV cache.",
        _generate_args,
        cmd_generate,
    ),
    (
        "evaluate",
        "lm-evaluation-harness tasks on every budget of one checkpoint",
        "Score lm-eval tasks (loglikelihood, rolling loglikelihood and greedy generate_until) on each budget's "
        "sub-model, served from one copy of the elastic weights. Writes OUT/lm_eval.md (budget x task) and "
        "lm-eval's JSON per budget. An exported budget is scored the same way with lm-eval's own model: "
        "`lm_eval --model hf --model_args pretrained=OUT/budget_0.5/hf --tasks ...`.",
        _evaluate_args,
        cmd_evaluate,
    ),
    (
        "plan",
        "dry run: layout, parameters, per-GPU memory and GPU-hours of an elastic job",
        "Resolve an elastic config for a cluster without a GPU: parallel layout, parameter counts of the parent "
        "and each budget, per-GPU memory (weights, grads, optimizer, teacher, activations, logits) at each "
        "stage's sequence length, tokens and steps per stage, GPU-hours at an assumed MFU. Exits 2 with the "
        "reason when it cannot fit.",
        _plan_args,
        cmd_plan,
    ),
    (
        "demo",
        "run the tiny CPU recipe end to end",
        "Prepare the built-in corpus, pretrain the tiny parent, score and sort it, then train budgets 100/75/50% "
        "at once by elastic distillation, extract each as standalone Megatron and Hugging Face checkpoints, "
        "evaluate every model on one held-out set and write OUT/report.md with a results table and a Pareto "
        "plot, on this machine. Re-running reuses finished phases.",
        _demo_args,
        cmd_demo,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-elastic", description="Nemotron Elastic on Megatron-Core: nested hybrid Mamba-2/attention LLMs."
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_line, description, add_arguments, handler in SUBCOMMANDS:
        command = sub.add_parser(name, help=help_line, description=description)
        add_arguments(command)
        command.set_defaults(func=handler)
    return p


def main(argv=None) -> int:
    """Run one subcommand. A project error (:class:`~megatron_elastic.errors.ElasticError`) becomes one line on
    stderr naming the field and the fix, and exit code 2; ``--debug`` re-raises it with its traceback. Both exit 2s
    (a project error, a bad command line) leave the launcher's bad-input marker: Slurm does not run the job again.
    Process groups the command set up are torn down before it returns (``parallel.release_at_exit``)."""
    _quiet_warnings()
    from megatron_elastic.training.preemption import mark_bad_input

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 2:
            mark_bad_input("bad command line")
        raise
    from megatron_elastic.errors import ElasticError

    succeeded = False
    try:
        code = args.func(args)
        succeeded = code == 0
        return code
    except ElasticError as e:
        message = " ".join(str(e).split())  # one line, whatever the message's own line breaks
        mark_bad_input(message)
        if args.debug:
            raise
        print(f"megatron-elastic {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if "megatron_elastic.parallel" in sys.modules:  # only a command that set up process groups imported it
            sys.modules["megatron_elastic.parallel"].release_at_exit(succeeded)


if __name__ == "__main__":
    sys.exit(main())
