"""Property-based: any model config either validates, builds and runs a forward pass, or is rejected up front
with a ConfigError naming a field; never a crash deep inside the model."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELDS = st.fixed_dictionaries(
    {
        "hybrid_pattern": st.text(alphabet="M*-", min_size=1, max_size=5),
        "vocab_size": st.integers(1, 300),
        "hidden_size": st.integers(1, 48),
        "ffn_hidden_size": st.integers(1, 64),
        "num_attention_heads": st.integers(1, 8),
        "num_query_groups": st.integers(1, 8),
        "kv_channels": st.integers(1, 16),
        "mamba_num_heads": st.integers(1, 8),
        "mamba_head_dim": st.integers(1, 8),
        "mamba_num_groups": st.integers(1, 4),
        "mamba_state_dim": st.integers(1, 8),
        "mamba_chunk_size": st.integers(1, 16),
        "mamba_conv_kernel": st.integers(1, 5),
        "elastic_ffn_groups": st.integers(1, 4),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=FIELDS, seq=st.integers(1, 12))
def test_config_validates_and_runs_or_is_rejected_clearly(single_process_parallel, fields, seq):
    from megatron_elastic.model.builder import build_hybrid_model, causal_attention_mask, position_ids_for
    from megatron_elastic.model.config import ConfigError, HybridConfig, tiny_defaults

    try:
        config = HybridConfig.from_dict({**tiny_defaults(), **fields, "params_dtype": torch.float32})
    except ConfigError as e:
        field = str(e).split(":")[0]
        assert field and " " not in field.split(".")[0], f"the error must start with the field: {e}"
        return
    model = build_hybrid_model(config)
    ids = torch.randint(0, config.vocab_size, (2, seq))
    with torch.no_grad():
        out = model(ids, position_ids_for(ids), causal_attention_mask(seq))
    assert out.shape == (2, seq, config.vocab_size) and torch.isfinite(out).all()
