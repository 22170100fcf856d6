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


@pytest.mark.parametrize("seed", range(3))
def test_batched_left_padded_prompts_decode_as_each_alone(single_process_parallel, seed):
    """Prompts of different lengths in one batch (left padding masked out of attention, zeroed in the Mamba conv
    and scan): every row's tokens and logits are those of decoding it alone."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.serving.decode import decode, left_pad, stream

    cfg = _cfg(mamba_chunk_size=4)
    torch.manual_seed(seed)
    model = build_elastic_model(cfg).eval()
    arch = ElasticArch.full(cfg) if seed == 0 else random_heterogeneous_arch(cfg, random.Random(seed)).validate(cfg)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 260, (n,), generator=gen).tolist() for n in (9, 1, 5 + seed, 3)]
    with use_arch(model, arch):
        ids, lengths = left_pad(prompts, pad_id=257)
        steps = list(stream(model, ids, 6, prompt_lengths=lengths))
        batched = torch.stack([t for t, _ in steps], 1)
        batched_logits = torch.stack([lg for _, lg in steps], 1)
        for i, p in enumerate(prompts):
            alone, alone_logits = decode(model, torch.tensor([p]), 6, return_logits=True)
            torch.testing.assert_close(batched_logits[i], alone_logits[0], rtol=1e-4, atol=1e-4)
            assert batched[i].tolist() == alone[0].tolist(), i


def test_server_batch_stops_each_row_at_its_own_stop_token(single_process_parallel):
    """``ElasticServer.generate_batch``: each row is what greedy decoding gives alone, cut after its first stop
    token; rows that stop early do not change the others."""
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.serving.generate import ElasticServer

    cfg = _cfg(mamba_chunk_size=4)
    torch.manual_seed(3)
    server = ElasticServer(build_elastic_model(cfg).eval(), {"1": ElasticArch.full(cfg)})
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 260, (n,), generator=gen).tolist() for n in (6, 2, 11)]
    alone = [server.generate(torch.tensor([p]), 1.0, 10)[0].tolist() for p in prompts]
    stop = alone[1][2]  # row 1 stops at its third token; the others wherever that token appears, if at all
    rows = server.generate_batch(prompts, 1.0, 10, stop_ids=[stop])
    for got, want in zip(rows, alone):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert got == want[:cut]
    assert len(rows[1]) <= 3
