"""The curriculum switches stage at the configured token count, with the stage's sequence length and budget
sampling; temperature and logit scale anneal linearly; draws are reproducible per step."""

from collections import Counter

import pytest

from megatron_elastic.elastic.curriculum import Curriculum, Stage


def test_paper_default_switches_stage_at_its_token_count():
    c = Curriculum.paper_default(
        [1.0, 0.75, 0.5], total_tokens=110_000, short_seq=256, long_seq=1024, short_batch=8, long_batch=4
    )
    assert [s.tokens for s in c.stages] == [65_000, 45_000]
    i, s = c.stage_at(64_999)
    assert (i, s.seq_length, s.budget_weights) == (0, 256, [1 / 3] * 3)
    i, s = c.stage_at(65_000)
    assert (i, s.seq_length, s.global_batch_size, s.budget_weights) == (1, 1024, 4, [0.5, 0.3, 0.2])
    assert c.stage_at(10**9)[0] == 1


def test_sampling_follows_the_stage_weights_and_is_reproducible():
    c = Curriculum.paper_default([1.0, 0.75, 0.5], 110_000, 256, 1024, 8, 4)
    draws = [b for step in range(2000) for b in c.sample_budgets(70_000, 3, step)]
    freq = Counter(draws)
    for budget, weight in zip(c.budgets, [0.5, 0.3, 0.2]):
        assert freq[budget] / len(draws) == pytest.approx(weight, abs=0.02)
    uniform = Counter(b for step in range(2000) for b in c.sample_budgets(0, 3, step))
    for budget in c.budgets:
        assert uniform[budget] / 6000 == pytest.approx(1 / 3, abs=0.02)
    assert c.sample_budgets(70_000, 5, 17) == c.sample_budgets(70_000, 5, 17)


def test_annealing_endpoints():
    c = Curriculum([1.0, 0.5], [Stage("a", 100, 8, 2, [1, 1])])
    assert c.tau_at(0) == 1.0 and c.tau_at(100) == pytest.approx(0.05) and c.tau_at(50) == pytest.approx(0.525)
    assert c.logit_scale_at(0) == 1.0 and c.logit_scale_at(100) == 10.0


def test_bad_stages_are_rejected():
    with pytest.raises(ValueError, match="needs 2 non-negative weights"):
        Curriculum([1.0, 0.5], [Stage("a", 100, 8, 2, [1.0])])
    with pytest.raises(ValueError, match="must be positive"):
        Curriculum([1.0, 0.5], [Stage("a", 0, 8, 2, [1, 1])])
    with pytest.raises(ValueError, match="at least one stage"):
        Curriculum([1.0], [])
