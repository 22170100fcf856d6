"""The sort permutes every tensor that touches an axis and leaves the parent's function unchanged."""

import pytest
import torch

from megatron_elastic.importance.permute import Permutation, order_within_groups, permute_state_dict


def _cfg(**kw):
    """The odd-sized toy of the elastic-model tests (every axis a different size), six layers."""
    from tests.elastic.test_elastic_model import _cfg as odd_sized_config

    return odd_sized_config(**{"hybrid_pattern": "M-*M-*", **kw})


def random_permutation(cfg, seed):
    from megatron_elastic.importance.permute import random_permutation as draw

    return draw(cfg, torch.Generator().manual_seed(seed))


def _logits(model):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    return model(ids, position_ids_for(ids), causal_attention_mask(17))


@pytest.mark.parametrize(
    "seed,overrides", [(0, {}), (1, {"gated_linear_unit": True, "activation": "silu"}), (2, {"elastic_ffn_groups": 4})]
)
def test_permuted_parent_has_identical_logits(single_process_parallel, seed, overrides):
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg(**overrides)
    torch.manual_seed(seed)
    model = build_hybrid_model(cfg)
    before = _logits(model)
    sd = model.state_dict()
    permuted = permute_state_dict(sd, cfg, random_permutation(cfg, seed))
    changed = [k for k in sd if not k.endswith("_extra_state") and not torch.equal(sd[k], permuted[k])]
    assert len(changed) > 20, "the permutation must actually move weights"
    model.load_state_dict(permuted)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_invalid_permutations_are_rejected(single_process_parallel):
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    sd = build_hybrid_model(cfg).state_dict()
    across_groups = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7])  # swaps a head of group 0 with one of group 1
    with pytest.raises(ValueError, match="within each of the 2 groups"):
        permute_state_dict(sd, cfg, Permutation(mamba_heads={0: across_groups}))
    with pytest.raises(ValueError, match="not a permutation"):
        permute_state_dict(sd, cfg, Permutation(hidden=torch.zeros(32, dtype=torch.long)))


def test_order_within_groups():
    s = torch.tensor([0.1, 0.9, 0.5, 3.0, 2.0, 1.0])
    assert order_within_groups(s, 2).tolist() == [1, 2, 0, 3, 4, 5]
    assert order_within_groups(s, 1).tolist() == [3, 4, 5, 1, 2, 0]
