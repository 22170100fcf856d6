import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture
def single_process_parallel():
    """Megatron's parallel state for one process (TP=PP=DP=1, gloo on CPU)."""
    from megatron_elastic.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, seed=1234)
    yield
    destroy_parallel()
