"""Switching budgets during one generation: a switched generation equals, token for token, the smaller budget on
the prefix followed by the larger budget on prefix + generated tokens (greedy), and schedules parse or fail with
one line that names the syntax."""

import random

import pytest
import torch

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.errors import ConfigError
from megatron_elastic.serving.schedule import BudgetSchedule, Phase
from tests.elastic.test_elastic_model import random_heterogeneous_arch
from tests.importance.test_permute import _cfg


def _server(seed=0):
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.serving.generate import ElasticServer

    cfg = _cfg(mamba_chunk_size=4)
    torch.manual_seed(seed)
    model = build_elastic_model(cfg).eval()
    small = random_heterogeneous_arch(cfg, random.Random(seed + 1)).validate(cfg)
    archs = {"1": ElasticArch.full(cfg), "0.5": small}
    return ElasticServer(model, archs), archs


def _reference(server, archs, prompt, pieces):
    """``pieces``: (budget, number of tokens) run one after another, each a fresh decode of everything so far."""
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.serving.decode import decode

    context = prompt
    for budget, n in pieces:
        with use_arch(server.model, archs[budget]):
            context = torch.cat([context, decode(server.model, context, n)], 1)
    return context[:, prompt.shape[1] :]


@pytest.mark.parametrize("seed", range(2))
def test_a_switch_after_n_tokens_equals_small_then_large_on_the_whole_context(single_process_parallel, seed):
    server, archs = _server(seed)
    prompt = torch.randint(0, 256, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
    out = server.generate_scheduled(prompt, "0.5 for 5, then 1", max_new_tokens=12)
    want = _reference(server, archs, prompt, [("0.5", 5), ("1", 7)])
    assert torch.equal(out.tokens, want)
    assert out.switches == [(0, "0.5"), (5, "1")]
    # the switch changes the continuation: the small budget alone goes elsewhere (else the test shows nothing)
    small_only = _reference(server, archs, prompt, [("0.5", 12)])
    assert not torch.equal(out.tokens, small_only)


def test_a_switch_at_a_stop_sequence_and_back(single_process_parallel):
    """'0.5 until X, then 1 for 3, then 0.5' where X is two token ids the small budget writes at positions 4-5."""
    server, archs = _server(3)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    small = _reference(server, archs, prompt, [("0.5", 10)])[0].tolist()
    stop = tuple(small[4:6])
    first = next(i for i in range(1, len(small)) if tuple(small[i - 1 : i + 1]) == stop) + 1  # tokens up to X
    schedule = BudgetSchedule((Phase("0.5", until="X", until_ids=stop), Phase("1", tokens=3), Phase("0.5")))
    out = server.generate_scheduled(prompt, schedule, max_new_tokens=first + 6)
    want = _reference(server, archs, prompt, [("0.5", first), ("1", 3), ("0.5", 3)])
    assert torch.equal(out.tokens, want)
    assert out.switches == [(0, "0.5"), (first, "1"), (first + 3, "0.5")]


def test_until_text_uses_the_tokenizer_and_an_absent_stop_never_switches(single_process_parallel):
    server, archs = _server(0)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    never = [300, 301, 302]  # ids outside the model's vocabulary: the small budget cannot write them
    out = server.generate_scheduled(prompt, "0.5 until </think>, then 1", 8, tokenize=lambda text: never)
    assert out.switches == [(0, "0.5")]
    assert torch.equal(out.tokens, _reference(server, archs, prompt, [("0.5", 8)]))


@pytest.mark.parametrize(
    "text, phases",
    [
        ("0.5 until </think>, then 1.0", [Phase("0.5", until="</think>"), Phase("1")]),
        ("0.50 for 128, then 0.75 until 'The answer', then 1", None),
        ("0.6", [Phase("0.6")]),
    ],
)
def test_schedules_parse(text, phases):
    got = BudgetSchedule.parse(text)
    if phases is not None:
        assert list(got.phases) == phases
    else:
        assert [str(p) for p in got.phases] == ["0.5 for 128", "0.75 until The answer", "1"]
    assert BudgetSchedule.parse(str(got)) == got


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("half until x, then 1", "not a budget fraction"),
        ("1.5 for 3, then 1", r"fraction in \(0, 1\]"),
        ("0.5, then 1", "needs 'until TEXT' or 'for N'"),
        ("0.5 for 3, then 1 for 4", "the last phase runs to the end"),
        ("0.5 for -3, then 1", "positive whole number"),
        ("0.5 for 2.5, then 1", "positive whole number"),
    ],
)
def test_bad_schedules_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        BudgetSchedule.parse(text)
    assert "\n" not in str(e.value)


def test_schedule_errors_before_decoding(single_process_parallel):
    server, _ = _server(0)
    prompt = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(KeyError, match="trained budgets"):
        server.generate_scheduled(prompt[:1], "0.25 for 2, then 1", 4)
    with pytest.raises(ConfigError, match="one sequence at a time"):
        server.generate_scheduled(prompt, "0.5 for 2, then 1", 4)
    with pytest.raises(ConfigError, match="no token at all"):
        server.generate_scheduled(prompt[:1], "0.5 until x, then 1", 4, tokenize=lambda text: [])
