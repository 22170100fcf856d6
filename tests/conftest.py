import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

# The test files that take minutes (much of it waiting on Slurm job segments or subprocesses), dealt to the
# pytest-xdist workers in this order (scripts/run_tests.sh: --dist loadfile --no-loadscope-reorder; without the latter
# xdist deals the files with the most tests first and a one-test file of minutes starts last). The first three start
# at once, one per worker; the fourth is queued on the first worker, behind the rehearsal: the real-Slurm time-limit
# test is the one whose job segments stall when the machine is crowded (its 1-minute segments then spend most of
# their minute starting up), so it runs once the rehearsal's 8 ranks are gone instead of beside them.
LONGEST_FIRST = (
    "launch/test_rehearsal.py",
    "test_cli.py",
    "test_demo.py",
    "launch/test_real_slurm_time_limit.py",
    "launch/test_two_node_slurm.py",
    "launch/test_real_slurm.py",
    "training/test_kill_resume.py",
    "importance/test_importance_job.py",
)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), here), len(rank)))  # stable: else as found


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
