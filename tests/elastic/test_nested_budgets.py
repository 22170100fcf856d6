"""Train what you extract: nested budget draws on every step of a real (toy) run, and the exact baseline that
trains one fixed architecture and nothing else."""

import os

import pytest
import torch

from tests.elastic.test_elastic_training import _config, _train, _train_records


def test_every_step_samples_a_nested_set(single_process_parallel, parent, tmp_path, monkeypatch):
    """Every budget on every micro-batch ('all'): the architectures the student actually ran, in order 1.0, 0.75,
    0.5 per micro-batch, are nested on every step; the per-step log says so too."""
    from megatron_elastic.elastic import step as elastic

    ran = []
    original = elastic.set_arch

    def recording(model, arch, gates=None):
        if arch is not None and gates is not None:  # a training draw (evaluation passes no gates)
            ran.append(arch)
        return original(model, arch, gates)

    monkeypatch.setattr(elastic, "set_arch", recording)
    ckpt = str(tmp_path / "all")
    summary = _train(parent, ckpt, mode="all")
    full = ran[0]
    assert len(ran) % 3 == 0 and len(ran) >= 3 * 6
    for k in range(0, len(ran), 3):
        big, mid, small = ran[k : k + 3]
        assert big == full and mid.is_within(big) and small.is_within(mid), k
    recs = _train_records(ckpt)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert all(recs[i]["sampled_nested"] == 1.0 for i in recs)
    assert all(0.0 <= recs[i]["free_nested"] <= 1.0 for i in recs)
    assert 0.0 <= summary["extracted_sampled"] <= 1.0


def test_fixed_architecture_trains_only_that_sub_model(single_process_parallel, parent, tmp_path):
    """budgets [0.75] + fixed_arch: the weights the sub-model uses move, every other weight keeps the parent's
    value exactly (no weight decay), and extraction gives exactly that architecture."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.slicing import iter_sliced
    from megatron_elastic.elastic.source import load_parent, load_source
    from megatron_elastic.extraction.extract import extract

    sorted_model, job, _ = load_parent(os.path.join(parent, "sorted"))
    cfg = job.model_config()
    arch = ElasticArch.full(cfg)
    arch.hidden_size = 24
    first_mlp = next(i for i in arch.ffn_hidden_size)
    arch.ffn_hidden_size[first_mlp] = cfg.ffn_hidden_size // 2
    arch.skipped_layers = (len(cfg.hybrid_pattern) - 1,)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(arch.to_json(budget="0.75", trained=True, between=[0.75, 0.75]))
    stages = "[{name: s, tokens: 1024, seq_length: 32, global_batch_size: 8, budget_weights: [1]}]"
    ckpt = str(tmp_path / "fixed")
    from megatron_elastic.elastic.run import train_elastic

    cfg_job = _config(
        parent,
        ckpt,
        overrides=[
            f"fixed_arch={arch_file}",
            "budgets=[0.75]",
            f"curriculum.stages={stages}",
            "train.weight_decay=0.0",
        ],
    )
    summary = train_elastic(cfg_job, progress=False)
    assert summary["budgets"]["0.75"]["arch"] == arch.to_dict()

    before = {k: v for k, v in sorted_model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}
    after = load_source(ckpt).model.state_dict()
    # Where the sub-model reads each parent tensor: slice an index tensor the same way as the weights.
    index = {k: torch.arange(v.numel(), dtype=torch.float64).view_as(v) for k, v in before.items()}
    inside = {k: torch.zeros(v.numel(), dtype=torch.bool) for k, v in before.items()}
    for k in before:
        for _, idx in iter_sliced(iter([k]), index.__getitem__, cfg, arch):
            assert torch.equal(idx, idx.round()), f"{k}: slicing must only gather"
            inside[k][idx.reshape(-1).long()] = True
    moved_inside = 0
    for k, v in before.items():
        diff = (after[k].float() != v.float()).reshape(-1)
        assert not diff[~inside[k]].any(), f"{k}: a weight outside the sub-model changed"
        moved_inside += int(diff[inside[k]].sum())
    assert moved_inside > 0, "the sub-model trained"

    rows = extract(ckpt, str(tmp_path / "out"), budgets=["all"], fmt="megatron")
    assert [r["name"] for r in rows] == ["0.75"]
    with open(os.path.join(tmp_path / "out", "budget_0.75", "arch.json")) as f:
        assert ElasticArch.from_json(f.read()) == arch


def test_fixed_arch_config_errors_name_the_fix(parent, tmp_path):
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="cannot read"):
        _config(parent, str(tmp_path), overrides=[f"fixed_arch={tmp_path}/missing.json", "budgets=[0.75]"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden": 3}')
    with pytest.raises(ConfigError, match="not an ElasticArch JSON"):
        _config(parent, str(tmp_path), overrides=[f"fixed_arch={bad}", "budgets=[0.75]"])
    good = tmp_path / "good.json"
    good.write_text('{"hidden_size": 24}')
    with pytest.raises(ConfigError, match="exactly one entry below 1.0"):
        _config(parent, str(tmp_path), overrides=[f"fixed_arch={good}"])


def test_budgets_between_the_trained_ones_are_trained_nested_between_them(
    single_process_parallel, parent, tmp_path, monkeypatch
):
    """curriculum.between_share: some micro-batches run the step's untrained budget (``between_budget``); the
    architecture the student ran for it contains the smaller trained neighbour's draw of that step and lies within
    the larger one's (checked on the architectures); its KD loss and its size's offset are logged."""
    from megatron_elastic.elastic import step as elastic
    from megatron_elastic.elastic.run import train_elastic

    ran = []  # (budget the micro-batch trained, its nested draws of the step)
    original = elastic.nested_draws

    def recording(c, step, tau, scale, only=None):
        draws = original(c, step, tau, scale, only=only)
        if only is not None:
            ran.append((step, only, draws, c.config.curriculum.between_budget(step)))
        return draws

    monkeypatch.setattr(elastic, "nested_draws", recording)
    ckpt = str(tmp_path / "between")
    train_elastic(_config(parent, ckpt, overrides=["curriculum.between_share=0.5"]), progress=False)
    trained = {1.0, 0.75, 0.5}
    untrained = [(step, b, d) for step, b, d, between in ran if b not in trained and b == between]
    assert len(untrained) >= 4 and len(untrained) + sum(b in trained for _, b, _, _ in ran) == len(ran)
    for step, b, draws in untrained:
        lo, hi = max(t for t in trained if t < b), min(t for t in trained if t > b)
        assert 0.5 < b < 1.0 and lo < b < hi
        assert draws[lo].arch.is_within(draws[b].arch) and draws[b].arch.is_within(draws[hi].arch), step
        assert all(g.requires_grad for g in draws[b].gates.values())
    recs = _train_records(ckpt)
    assert any("kd/between" in r for r in recs.values())
    assert all("expected_fraction/between_offset" in r for r in recs.values())
    assert all(r["sampled_nested"] == 1.0 for r in recs.values())


def test_between_share_config_errors(parent, tmp_path):
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match=r"between_share: a fraction in \[0, 1\)"):
        _config(parent, str(tmp_path), overrides=["curriculum.between_share=1.5"])
    with pytest.raises(ConfigError, match="needs distill.budgets_per_step: sample"):
        _config(parent, str(tmp_path), mode="all", overrides=["curriculum.between_share=0.25"]).validate(1)
