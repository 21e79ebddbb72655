import os
from pathlib import Path

import pytest
import torch

from tidpo_core.runtime.offline import apply_offline_defaults

apply_offline_defaults()
# One torch thread for every model the tests train (tidpo_core.runtime.threads): results that depend on float
# summation order (a reward model judged on 7 eval pairs) are the same on every machine, and the tests'
# subprocesses do not oversubscribe CI's 2 cores. The thread-policy tests set or clear it themselves.
os.environ.setdefault("TIDPO_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: a second intra-op thread buys nothing, and on a CI machine shared with
    other jobs two threads that wait on each other were up to 10x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
