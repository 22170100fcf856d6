"""megatron_elastic: Nemotron Elastic on Megatron-Core."""

import wrapt

__version__ = "0.1.0"


def _register_with_transformers(_transformers) -> None:
    """Heterogeneous Hugging Face exports (``model_type: elastic_nemotron_h``) load through transformers' Auto
    classes without remote code once transformers is imported (now, or whenever it is, if ever)."""
    import megatron_elastic.extraction.hf_model  # noqa: F401  (registers on import)


wrapt.register_post_import_hook(_register_with_transformers, "transformers")
