"""Shared fixtures: one Ray session for the whole test run, the real-data folder, temp dirs.

Ray costs 5-9 s to start, so every test that needs it takes ``ray_session`` (session scoped)
instead of calling ``ray.init`` itself. Real scans come from ``$RAYMIM_TEST_DATA`` (default
``../shared/data`` beside the repository); tests that need them skip cleanly when absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `raymim prepare` keeps its de-identification key in a per-user file outside the dataset
# (raymim.io.deid); tests (and the commands they run) use one of their own, never the user's.
os.environ["RAYMIM_DEID_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="raymim-test-key-"), "deid.key")
SHARED_DATA = Path(os.environ.get("RAYMIM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of small real CT/MR scans (see its README); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set RAYMIM_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # More logical CPUs than cores so Train workers and Ray Data tasks never starve each
        # other on a 2-core CI machine (DESIGN.md: "Cluster resources are not enough").
        ray.init(
            num_cpus=4,
            # The dashboard serves the state API, which Ray Train V2's PlacementGroupCleaner
            # uses to notice a dead controller; without it, Train runs of trials stopped by Tune
            # leak their placement groups and later Ray Data tasks never get a CPU.
            include_dashboard=True,
            log_to_driver=False,
            object_store_memory=512 * 1024 * 1024,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()
