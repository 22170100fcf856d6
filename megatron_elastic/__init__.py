"""megatron_elastic: Nemotron Elastic on Megatron-Core."""

__version__ = "0.1.0"
