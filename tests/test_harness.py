"""lm-evaluation-harness on an elastic checkpoint: every budget scored from one weight copy by our ``LM`` gives
the scores lm-eval's own ``hf`` model gives on that budget's Hugging Face export (the independent referee), on
local tasks made here (multiple choice, rolling log-likelihood, greedy generation)."""

import json
import os
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf model imports it

TASK_HEADER = """task: elastic_{name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
"""
CHOICES_TASK = """
output_type: multiple_choice
doc_to_text: "{{{{prefix}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ROLLING_TASK = """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
GENERATE_TASK = """
output_type: generate_until
doc_to_text: "{{{{prefix}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list:
  - metric: exact_match
"""
PYTHON_LINES = [
    "import os\n",
    "def __init__(self):\n",
    "    return self\n",
    "from typing import List\n",
    "class Error(Exception):\n",
    "    if x is None:\n",
]


def _tasks(root: str) -> str:
    """Three local tasks: pick the real Python line over its shuffled letters (the right answer is known), score
    Python lines' log-likelihood, continue a line greedily (its own greedy continuation is the target of half)."""
    rng = random.Random(0)
    os.makedirs(root, exist_ok=True)
    choices, rolling, generate = [], [], []
    for i, line in enumerate(PYTHON_LINES):
        scrambled = "".join(rng.sample(line.strip(), len(line.strip()))) + "\n"
        options = [line, scrambled] if i % 2 else [scrambled, line]
        choices.append({"prefix": "x = 1\n", "choices": options, "answer": options.index(line)})
        rolling.append({"text": "".join(PYTHON_LINES[i:] + PYTHON_LINES[:i])})
        generate.append({"prefix": line[: len(line) // 2], "target": line[len(line) // 2 :].strip()})
    for name, rows, template in (
        ("choices", choices, CHOICES_TASK),
        ("rolling", rolling, ROLLING_TASK),
        ("generate", generate, GENERATE_TASK),
    ):
        data = os.path.join(root, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(root, f"{name}.yaml"), "w") as f:
            f.write((TASK_HEADER + template).format(name=name, data=data))
    return root


def _samples(res, task):
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def test_every_budget_scores_as_lm_eval_hf_scores_its_export(elastic_run, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megatron_elastic.cli import main
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.harness import elastic_lm
    from megatron_elastic.serving.generate import ElasticServer

    include = _tasks(str(tmp_path / "tasks"))
    tasks = ["elastic_choices", "elastic_rolling", "elastic_generate"]
    out = str(tmp_path / "lm_eval")
    assert main(["evaluate", "--checkpoint", elastic_run, "--tasks", ",".join(tasks), "--out", out,
                 "--include-path", include, "--batch-size", "3"]) == 0  # fmt: skip
    table = {b: json.load(open(os.path.join(out, f"lm_eval_budget_{b}.json")))["results"] for b in ("1", "0.75", "0.5")}
    assert "| budget |" in open(os.path.join(out, "lm_eval.md")).read()

    exports = {r["name"]: r["hf"] for r in extract(elastic_run, str(tmp_path / "x"), budgets=["all"], fmt="hf")}
    server, manager = ElasticServer.from_checkpoint(elastic_run), TaskManager(include_path=include)
    run = lambda lm: lm_eval.simple_evaluate(  # noqa: E731
        model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0
    )
    for budget, hf_dir in exports.items():
        ours = run(elastic_lm(server, budget, batch_size=4))
        hf = run(HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=2))
        for s_ours, s_hf in zip(_samples(ours, "elastic_choices"), _samples(hf, "elastic_choices")):
            got = [float(r[0][0]) for r in s_ours["resps"]]
            want = [float(r[0][0]) for r in s_hf["resps"]]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
            assert [r[0][1] for r in s_ours["resps"]] == [r[0][1] for r in s_hf["resps"]]  # greedy flags
        for s_ours, s_hf in zip(_samples(ours, "elastic_rolling"), _samples(hf, "elastic_rolling")):
            assert float(s_ours["resps"][0][0]) == pytest.approx(float(s_hf["resps"][0][0]), rel=1e-4)
        for s_ours, s_hf in zip(_samples(ours, "elastic_generate"), _samples(hf, "elastic_generate")):
            assert s_ours["resps"] == s_hf["resps"]
        for task in tasks:
            metrics = {
                k: v for k, v in hf["results"][task].items() if isinstance(v, (int, float)) and "stderr" not in k
            }
            assert metrics, task
            for k, v in metrics.items():
                assert table[budget][task][k] == pytest.approx(v, rel=1e-4), (budget, task, k)
                assert ours["results"][task][k] == pytest.approx(v, rel=1e-4), (budget, task, k)


def test_a_continuation_scores_its_log_probabilities_under_the_sub_model(elastic_run):
    """Our LM's (log-likelihood, greedy) of one request, against the sub-model's own forward over the whole text
    computed here in float64, position by position (padding in a batch changes nothing)."""
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.harness import elastic_lm
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for
    from megatron_elastic.serving.generate import ElasticServer

    server = ElasticServer.from_checkpoint(elastic_run)
    lm = elastic_lm(server, "0.5", batch_size=2)
    ctx, cont = lm.tok_encode("def f(x):\n    return"), lm.tok_encode(" x + 1\n")
    short = (lm.tok_encode("a"), lm.tok_encode("b"))  # batched with a shorter row: right padding
    scores = lm._loglikelihood_tokens([(("", ""), ctx, cont), (("", ""), *short)])
    ids = torch.tensor([ctx + cont])
    with use_arch(server.model, server.arch("0.5")), torch.no_grad():
        logits = server.model(ids, position_ids_for(ids), causal_attention_mask(ids.shape[1])).double()
    logprobs = torch.log_softmax(logits[0, len(ctx) - 1 : -1], -1)
    want = float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())
    assert scores[0][0] == pytest.approx(want, rel=1e-5)
    assert scores[0][1] == (logprobs.argmax(-1).tolist() == cont)


def test_evaluate_refuses_what_it_cannot_do(elastic_run, tmp_path):
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.harness import evaluate_budgets, parse_tasks

    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        evaluate_budgets(elastic_run, ["no_such_task_xyz"], ["all"], str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="not a directory"):
        evaluate_budgets(elastic_run, ["x"], ["all"], str(tmp_path / "o"), include_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="task names"):
        parse_tasks(" , ")
