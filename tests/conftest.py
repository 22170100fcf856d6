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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Data, a briefly pretrained toy parent and its importance output (sorted parent), built once."""
    from megatron_elastic.parallel import destroy_parallel
    from tests.tiny_pipeline import make_tiny_sorted_parent

    paths = make_tiny_sorted_parent(str(tmp_path_factory.mktemp("pipeline")))
    destroy_parallel()
    return paths


@pytest.fixture
def parent(tiny_pipeline):
    """The toy sorted parent's importance directory (what `train` reads)."""
    return tiny_pipeline["importance"]


@pytest.fixture
def elastic_run(single_process_parallel, parent, tmp_path):
    """A toy elastic training run (budgets 1, 0.75, 0.5) of the sorted parent, in this process."""
    from tests.elastic.test_elastic_training import _train

    ckpt = str(tmp_path / "elastic")
    _train(parent, ckpt)
    return ckpt
