"""`megatron-elastic demo` end to end (as the README runs it, in a subprocess) on a toy parent: every phase runs,
the report holds every budget and baseline, the extracted models are what the report scores, and a second run
reuses every finished phase."""

import importlib.util
import json
import subprocess
import sys

from megatron_elastic.elastic.arch import ElasticArch
from tests.tiny_pipeline import TINY_PARENT_JOB

STAGES = (
    "curriculum.stages=[{name: short-context, tokens: 2048, seq_length: 32, global_batch_size: 8, "
    "budget_weights: [1, 1, 1]}, {name: long-context, tokens: 1024, seq_length: 64, global_batch_size: 4, "
    "budget_weights: [0.5, 0.3, 0.2]}]"
)


def _demo(out, cfg, precision="bfloat16"):
    # bfloat16 on every machine (emulated where the CPU has no bf16 products): the one CPU run of the whole pipeline
    # in Megatron's mixed precision; float32 runs through every other pipeline test
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_elastic",
            "demo",
            "--quick",
            "--precision",
            precision,
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--max-bytes",
            "1000000",
            "--no-progress",
            "--set",
            "train.train_iters=8",
            "--set",
            "train.lr_warmup_iters=2",
            "--set",
            "train.eval_interval=4",
            "--set",
            "checkpoint.save_interval=8",
            "--elastic-set",
            STAGES,
            "--elastic-set",
            "train.micro_batch_size=4",
            "--elastic-set",
            "data.eval_seq_length=64",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_runs_every_phase_writes_the_report_and_reuses_finished_phases(tmp_path):
    cfg = tmp_path / "parent.yaml"
    cfg.write_text(TINY_PARENT_JOB.format(data="unused", ckpt="unused", iters=8, vocab_size=264))
    out = tmp_path / "demo"
    r = _demo(out, cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for k in range(1, 9):
        assert f"[{k}/8]" in r.stdout
    rows = json.loads((out / "results.json").read_text())
    names = [x["name"] for x in rows]
    assert names == ["parent", "elastic 1", "elastic 0.75", "elastic 0.5", "pruned 0.75", "pruned 0.5"]
    by = {x["name"]: x for x in rows}
    summary = json.loads((out / "elastic" / "summary.json").read_text())
    for b in ("1", "0.75", "0.5"):
        # the report scores the extracted standalone model of the architecture the elastic run chose
        assert by[f"elastic {b}"]["parameters"] == summary["budgets"][b]["parameters"]
        hf_config = json.loads((out / "extracted" / f"budget_{b}" / "hf" / "config.json").read_text())
        assert hf_config["model_type"] == "nemotron_h"  # the recipe's sub-models are homogeneous: plain NemotronH
    assert by["pruned 0.5"]["parameters"] == by["elastic 0.5"]["parameters"] < by["parent"]["parameters"]
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names) and "pareto.png" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # the Pareto curve after training: ~10 budgets, the trained ones scored as their extracted models were
    curve = json.loads((out / "budget_curve.json").read_text())
    assert len(curve) >= 10 and [c["budget"] for c in curve][0] == "1" and curve[-1]["budget"] == "0.5"
    assert {c["budget"] for c in curve if c["trained"]} == {"1", "0.75", "0.5"}
    arch_of = {c["budget"]: ElasticArch.from_dict(c["arch"]) for c in curve}
    for c in curve:  # every budget nested between its trained neighbours
        if None in c["between"]:  # below the smallest trained choice: bounded by the space alone
            continue
        lo, hi = (arch_of[f"{b:g}"] for b in c["between"])  # the toy run's budgets may miss their targets
        assert lo.is_within(arch_of[c["budget"]]) and arch_of[c["budget"]].is_within(hi), c["budget"]
    for c in curve:  # what the evaluation phase scored is taken over, under the curve's budget names
        if c["trained"]:
            assert abs(c["elastic_bpb"] - by[f"elastic {c['budget']}"]["bpb"]) < 1e-4, c
            pruned = by["parent" if c["budget"] == "1" else f"pruned {c['budget']}"]
            assert abs(c["pruned_bpb"] - pruned["bpb"]) < 1e-4, c
    assert "budget_curve.png" in report and (out / "budget_curve.png").read_bytes()[:4] == b"\x89PNG"
    if importlib.util.find_spec("lm_eval"):  # lm-eval's accuracy of each budget, as lm-eval's own JSON says
        for b in ("1", "0.75", "0.5"):
            acc = json.loads((out / "lm_eval" / f"lm_eval_budget_{b}.json").read_text())["results"]
            assert f"| {b} | {acc['heldout_next_line']['acc,none']:.4f} |" in report

    # vLLM's convention from the trained run (the recipe's sub-models are homogeneous): plain nemotron_h whose
    # intermediate_size (an integer, or one entry per MLP layer read as vLLM reads it) is each MLP's rows
    vllm = subprocess.run(
        [sys.executable, "-m", "megatron_elastic", "extract", "--checkpoint", str(out / "elastic"), "--format", "vllm"]
        + ["--out", str(tmp_path / "vllm")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    from safetensors.torch import load_file

    for b in ("1", "0.75", "0.5"):
        folder = tmp_path / "vllm" / f"budget_{b}" / "vllm"
        vcfg = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        pattern, sizes = vcfg["hybrid_override_pattern"], vcfg["intermediate_size"]
        if isinstance(sizes, int):  # every MLP the same size: vLLM takes the integer as it is
            sizes = [sizes] * pattern.count("-")
        assert vcfg["model_type"] == "nemotron_h" and len(sizes) == pattern.count("-")
        for i, s in enumerate(pattern):
            if s == "-":
                up_rows = weights[f"backbone.layers.{i}.mixer.up_proj.weight"].shape[0]
                assert sizes[pattern[: i + 1].count("-") - 1] == up_rows

    again = _demo(out, cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing trained parent" in again.stdout and "reusing the elastic run" in again.stdout
    strip = lambda rs: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in rs]  # noqa: E731
    assert strip(json.loads((out / "results.json").read_text())) == strip(rows)  # same models, same tokens
    assert "in bfloat16" in (out / "report.md").read_text()

    # a run in another precision does not finish this one with its bf16 parent: one line naming the fix
    other = _demo(out, cfg, precision="float32")
    assert other.returncode != 0 and "reusing the elastic run" not in other.stdout
    assert "holds a parent trained in bfloat16, this run asks for float32" in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr


def test_the_report_compares_a_run_of_the_recipe_with_its_spread_over_seeds(tmp_path, monkeypatch):
    """A run of the unchanged recipe is set against the packaged spread (inside within a float-noise slack, else
    NO); a changed recipe (--quick, --set, ...) has no spread to compare with."""
    import argparse

    from megatron_elastic import demo

    spread = {
        "runs": 3,
        "seeds": [1, 2, 3],
        "machine": "test",
        "rows": {
            "parent": {"bpb_mean": 2.02, "bpb_min": 2.01, "bpb_max": 2.03},
            "elastic 0.5": {"bpb_mean": 2.16, "bpb_min": 2.15, "bpb_max": 2.17},
        },
    }
    bf16_spread = {**spread, "machine": "test, bf16"}
    paths = {}
    for precision, content in (("float32", spread), ("bfloat16", bf16_spread)):
        paths[demo.SPREADS[precision]] = tmp_path / f"{precision}.json"
        paths[demo.SPREADS[precision]].write_text(json.dumps(content))
    monkeypatch.setattr(demo, "recipe_path", lambda name: str(paths.get(name, name)))
    plain = argparse.Namespace(quick=False, config=None, set=None, elastic_set=None, max_bytes=demo.DEFAULT_MAX_BYTES)
    assert demo.recipe_spread(plain, "float32") == spread
    assert demo.recipe_spread(plain, "bfloat16") == bf16_spread  # each precision against its own seeds
    assert demo.recipe_spread(plain, "float16") is None  # a precision without a spread
    for changed in ({"quick": True}, {"set": ["train.lr=1"]}, {"elastic_set": ["x=1"]}, {"max_bytes": 10}):
        assert demo.recipe_spread(argparse.Namespace(**{**vars(plain), **changed}), "float32") is None, changed
    rows = [
        {"name": "parent", "bpb": 2.0330},  # above the range by less than the slack
        {"name": "elastic 0.5", "bpb": 2.20},  # outside
        {"name": "pruned 0.5", "bpb": 3.0},  # not in the spread: left out
    ]
    table = demo.spread_markdown(rows, spread).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| parent | 2.033 |") and table[2].endswith("| yes |")
    assert table[3].startswith("| elastic 0.5 | 2.200 |") and table[3].endswith("| NO |")


def test_the_demo_chooses_bfloat16_where_the_cpu_multiplies_it_in_hardware(tmp_path, monkeypatch):
    """--precision auto: bfloat16 on a CPU reporting avx512_bf16 or amx_bf16 (read from its cpuinfo, here fakes and
    this machine's own, checked against grep), float32 elsewhere; an explicit choice is taken as it is."""
    import pytest
    import torch

    from megatron_elastic import demo
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.ops import cpu_gemm

    def cpuinfo(flags):
        path = tmp_path / f"cpuinfo_{len(flags)}"
        path.write_text("".join(f"processor\t: {i}\nflags\t\t: {' '.join(flags)}\n\n" for i in range(2)))
        return str(path)

    assert cpu_gemm.cpu_bf16_flags(cpuinfo(["fpu", "avx2", "avx512f", "avx512_bf16"])) == ["avx512_bf16"]
    assert cpu_gemm.cpu_bf16_flags(cpuinfo(["avx512f", "amx_tile", "amx_bf16", "avx512_bf16"])) == [
        "avx512_bf16",
        "amx_bf16",
    ]
    assert cpu_gemm.cpu_bf16_flags(cpuinfo(["fpu", "avx2", "avx512f", "avx512_bf16x"])) == []  # a whole flag only
    assert cpu_gemm.cpu_bf16_flags(str(tmp_path / "absent")) == []  # no /proc/cpuinfo: not Linux
    if __import__("os").path.isfile("/proc/cpuinfo"):
        grep = subprocess.run(
            ["grep", "-ow", "-e", "avx512_bf16", "-e", "amx_bf16", "/proc/cpuinfo"], text=True, capture_output=True
        ).stdout.split()
        assert set(cpu_gemm.cpu_bf16_flags()) == set(grep)

    if not torch.cuda.is_available():
        monkeypatch.setattr(cpu_gemm, "cpu_bf16_flags", lambda: ["amx_bf16"])
        precision, why = demo.demo_precision("auto")
        assert precision == "bfloat16" and "amx_bf16" in why
        monkeypatch.setattr(cpu_gemm, "cpu_bf16_flags", lambda: [])
        assert demo.demo_precision("auto")[0] == "float32"
    assert demo.demo_precision("float32")[0] == "float32" and demo.demo_precision("bfloat16")[0] == "bfloat16"
    assert demo.precision_overrides("bfloat16") == demo.BF16_OVERRIDES and demo.precision_overrides("float32") == []
    with pytest.raises(ConfigError, match="use one of auto, float32, bfloat16"):
        demo.demo_precision("fp8")
