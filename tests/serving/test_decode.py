"""Decoding with the recurrent Mamba state and the KV cache gives the logits of re-running the whole sequence,
for the plain model and for elastic sub-models served from the parent's weights."""

import random

import pytest
import torch

from megatron_elastic.elastic.arch import ElasticArch
from tests.elastic.test_elastic_model import random_heterogeneous_arch
from tests.importance.test_permute import _cfg


def _full_logits(model, ids):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    with torch.no_grad():
        return model(ids, position_ids_for(ids), causal_attention_mask(ids.shape[1]))


@pytest.mark.parametrize("seed", range(3))
def test_decode_equals_rerunning_the_sequence(single_process_parallel, seed):
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.serving.decode import decode

    cfg = _cfg(mamba_chunk_size=4)  # prompts longer than a chunk and not a multiple of it
    torch.manual_seed(seed)
    model = build_elastic_model(cfg).eval()
    arch = ElasticArch.full(cfg) if seed == 0 else random_heterogeneous_arch(cfg, random.Random(seed)).validate(cfg)
    prompt = torch.randint(0, 260, (2, 7 + seed), generator=torch.Generator().manual_seed(seed))
    with use_arch(model, arch):
        new, step_logits = decode(model, prompt, max_new_tokens=6, return_logits=True)
        full = _full_logits(model, torch.cat([prompt, new], 1))
    # The logits that chose token t are the full run's logits at the position before it.
    want = full[:, prompt.shape[1] - 1 : prompt.shape[1] - 1 + new.shape[1]]
    torch.testing.assert_close(step_logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(new, want.argmax(-1))


def test_sampling_is_reproducible_and_top_k_restricts(single_process_parallel):
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.serving.generate import ElasticServer

    cfg = _cfg()
    torch.manual_seed(0)
    server = ElasticServer(build_elastic_model(cfg), {"1": ElasticArch.full(cfg)})
    prompt = torch.randint(0, 260, (1, 5), generator=torch.Generator().manual_seed(0))
    a = server.generate(prompt, 1.0, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = server.generate(prompt, 1.0, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(KeyError, match="trained budgets"):
        server.generate(prompt, 0.5, 2)
