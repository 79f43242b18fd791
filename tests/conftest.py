"""pytest session setup: worker pools from tests/distributed.py are shut down at the end of the session."""
import pytest

from tests.distributed import shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    yield
    shutdown_pools()
