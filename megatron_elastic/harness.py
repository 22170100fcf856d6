"""lm-evaluation-harness on every budget of one elastic checkpoint, from one copy of its weights.

:class:`ElasticLM` is an lm-eval ``LM`` (``TemplateLM``: lm-eval's own tokenisation of context/continuation pairs)
over the elastic model at one budget: ``loglikelihood`` and ``loglikelihood_rolling`` score batches of right-padded
rows in one causal forward each (padding on the right never reaches a real token's logits, in attention or in
the Mamba recurrence), ``generate_until`` decodes greedily ``batch_size`` contexts at once, left-padded, with the
recurrent state and KV cache (``serving.decode.decode_rows``) and cuts each at its first stop string. Windows,
truncation and the empty-context rule are lm-eval's (the same as its ``hf`` model), so a budget scored here and
its Hugging Face export scored with ``lm_eval --model hf`` agree. :func:`evaluate_budgets` runs lm-eval's
``simple_evaluate`` on each budget and writes one table (budget x task) and lm-eval's JSON per budget.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_elastic.compat import cpu_backend_suspended
from megatron_elastic.data.indexed import data_tokenizer_spec, iter_documents, read_metadata, split_prefix
from megatron_elastic.data.tokenizer import decode_text, load_tokenizer
from megatron_elastic.elastic.layers.model import use_arch
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.builder import causal_attention_mask
from megatron_elastic.serving.decode import decode_rows
from megatron_elastic.serving.generate import ElasticServer, budget_key

LM_EVAL_FIX = "pip install 'megatron-elastic[eval]' (lm-eval)"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ConfigError(f"evaluate --tasks needs lm-evaluation-harness: {LM_EVAL_FIX}") from None
    return lm_eval, TemplateLM


def elastic_lm(server: ElasticServer, budget, batch_size: int = 8, max_length: Optional[int] = None):
    """An lm-eval ``LM`` scoring ``server``'s model at ``budget`` (any budget the server serves)."""
    _, TemplateLM = _lm_eval()

    class ElasticLM(_ElasticLM, TemplateLM):
        pass

    return ElasticLM(server, budget, batch_size, max_length)


class _ElasticLM:
    """The body of the lm-eval ``LM`` (mixed with lm-eval's ``TemplateLM`` by :func:`elastic_lm`, so importing this
    module never needs lm-eval)."""

    backend = "causal"

    def __init__(self, server: ElasticServer, budget, batch_size: int = 8, max_length: Optional[int] = None):
        super().__init__()
        self.server, self.arch = server, server.arch(budget)
        self.model, self.tokenizer = server.model, server.tokenizer()
        self.batch_size = batch_size
        # lm-eval's hf model reads the same bound from the export's config (max_position_embeddings)
        self.max_length = max_length or self.model.config.max_sequence_length
        self._device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return decode_text(self.tokenizer, tokens)

    @torch.no_grad()
    def _logprobs(self, rows: Sequence[List[int]], tails: Sequence[int]) -> List[torch.Tensor]:
        """Log-probabilities ``[tail, vocab]`` (float32) of the next token after each of the last ``tail`` positions
        of each row: only the continuations' positions are normalised, not every position x the vocabulary."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long, device=self._device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        pos = torch.arange(width, device=self._device).unsqueeze(0).expand(len(rows), -1)
        self.model.eval()
        with use_arch(self.model, self.arch), cpu_backend_suspended():
            logits = self.model(ids, pos, causal_attention_mask(width).to(self._device))
        return [
            torch.log_softmax(logits[i, len(r) - t : len(r)].float(), dim=-1)
            for i, (r, t) in enumerate(zip(rows, tails))
        ]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request, scored
        longest first in batches (lm-eval's truncation: the last ``max_length`` tokens of context + continuation)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: Dict[int, Tuple[float, bool]] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
                conts.append(continuation)
            for i, cont, lp in zip(chunk, conts, self._logprobs(rows, [len(c) for c in conts])):
                target = torch.tensor(cont, device=lp.device)
                score = float(lp.gather(1, target[:, None]).sum())
                results[i] = (score, bool(torch.equal(lp.argmax(-1), target)))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return [results[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """A document's log-likelihood over lm-eval's disjoint rolling windows of ``max_length`` tokens."""
        from lm_eval import utils

        out = []
        for (text,) in (r.args for r in requests):
            windows = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces = [(None, *utils.make_disjoint_window(w)) for w in windows]
            out.append(sum(score for score, _ in self._loglikelihood_tokens(pieces)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy continuations, ``batch_size`` contexts decoded together (left-padded; requests with the same
        generation settings), each cut before the first of its ``until`` strings (and the end of document), at
        most ``max_gen_toks`` tokens (lm-eval's default 256)."""
        groups: Dict[str, List[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: Dict[int, str] = {}
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ConfigError("evaluate --tasks: only greedy generation is supported; set do_sample: false")
            max_new = int(kwargs.get("max_gen_toks", 256))

            # A stop string first completed by the newest token lies within the last few tokens (each decodes to
            # at least one character; the slack covers a multi-byte character cut at the window's start): decoding
            # that window, not the whole row, keeps the check linear in the generation's length.
            window = 2 * max((len(u.encode()) for u in until), default=0) + 8

            def done(_, new: List[int]) -> bool:
                return new[-1] == self.eot_token_id or any(u in self.tok_decode(new[-window:]) for u in until)

            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max(self.max_length - max_new, 1) :] for i in chunk]
                with use_arch(self.model, self.arch):
                    rows = decode_rows(self.model, prompts, max_new, 0, done)
                for i, new in zip(chunk, rows):
                    text = self.tok_decode([t for t in new if t != self.eot_token_id])
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [out[i] for i in range(len(requests))]


NEXT_LINE_TASK = "heldout_next_line"


def write_next_line_task(
    data_dir: str, out_dir: str, questions: int = 32, choices: int = 4, context: int = 256, seed: int = 0
) -> str:
    """A local lm-eval task from a ``prepare-data`` directory's validation split: given ``context`` characters of a
    held-out document, pick its real next line among ``choices`` (the others: lines of other held-out documents of
    similar length). Writes ``out_dir/{NEXT_LINE_TASK}.yaml`` and its JSONL; returns ``out_dir`` (``--include-path``).
    Accuracy is what a model knows of the data's text, in lm-eval's multiple-choice form."""
    tokenizer = load_tokenizer(data_tokenizer_spec(data_dir, read_metadata(data_dir)))
    docs = [decode_text(tokenizer, d) for d in iter_documents(split_prefix(data_dir, "valid"))]
    lines = [(i, line) for i, d in enumerate(docs) for line in d.split("\n") if 8 <= len(line.strip()) <= 80]
    rng = random.Random(seed)
    rows = []
    for doc, line in rng.sample(lines, min(len(lines), questions * 4)):
        text = docs[doc]
        at = text.find("\n" + line + "\n")
        others = [o for d, o in lines if d != doc and abs(len(o) - len(line)) <= 8]
        if at < 0 or len(others) < choices - 1:
            continue
        options = [line] + rng.sample(others, choices - 1)
        rng.shuffle(options)
        rows.append({"context": text[max(0, at - context) : at + 1], "choices": options, "answer": options.index(line)})
        if len(rows) == questions:
            break
    if not rows:
        raise ConfigError(f"{data_dir}: its validation split has no lines to ask about (write a longer split)")
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(os.path.abspath(out_dir), f"{NEXT_LINE_TASK}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    yaml_text = (
        f"task: {NEXT_LINE_TASK}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {json.dumps(data)}}}}}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n'
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    with open(os.path.join(out_dir, f"{NEXT_LINE_TASK}.yaml"), "w") as f:
        f.write(yaml_text)
    return out_dir


def parse_tasks(text: str) -> List[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give one or more lm-eval task names separated by commas, e.g. hellaswag,arc_easy")
    return tasks


def task_manager(include_path: Optional[str] = None):
    """lm-eval's task registry, with the tasks (YAML files) under ``include_path`` added."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path}: not a directory of lm-eval task YAML files")
    return TaskManager(include_path=include_path)


def evaluate_budgets(
    checkpoint: str,
    tasks: Sequence[str],
    budgets: Sequence[str],
    out_dir: str,
    include_path: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    server: Optional[ElasticServer] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on each budget of the elastic ``checkpoint`` (``all``: the trained
    budgets), one weight copy for all. Writes ``out_dir/lm_eval_budget_<b>.json`` (lm-eval's results) and
    ``out_dir/lm_eval.md`` (budget x task); returns {budget: {task: {metric: value}}}."""
    lm_eval, _ = _lm_eval()
    server = server or ElasticServer.from_checkpoint(checkpoint)
    manager = task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`"
            + ("" if include_path else " or add your own YAML with --include-path DIR")
        )
    wanted = list(server.archs) if list(budgets) == ["all"] else list(budgets)
    os.makedirs(out_dir, exist_ok=True)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for budget in wanted:
        lm = elastic_lm(server, budget, batch_size)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
        )
        key = budget_key(budget)
        with open(os.path.join(out_dir, f"lm_eval_budget_{key}.json"), "w") as f:
            json.dump(
                {k: res[k] for k in ("results", "versions", "n-shot", "config") if k in res}, f, indent=2, default=str
            )
        table[key] = {t: _metrics(m) for t, m in res["results"].items()}
    with open(os.path.join(out_dir, "lm_eval.md"), "w") as f:
        f.write(results_table(table))
    return table


def _metrics(task_result: dict) -> Dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5}``."""
    return {
        k.split(",")[0]: float(v)
        for k, v in task_result.items()
        if isinstance(v, (int, float)) and "," in k and "_stderr" not in k
    }


def results_table(table: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """A Markdown table: one row per budget, one column per task and metric."""
    columns = sorted({(t, m) for per_task in table.values() for t, ms in per_task.items() for m in ms})
    lines = [
        "| budget | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for budget, per_task in table.items():
        cells = [per_task.get(t, {}).get(m) for t, m in columns]
        lines.append(f"| {budget} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"
