import os

import numpy as np
import pytest
from hypothesis import settings

import fastloss

# CI runs Hypothesis with a fixed seed, so a red run is reproducible and a
# green one does not depend on luck. Local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.load_profile("ci")

# Thread counts every kernel is checked with: one, two, and more threads than
# the machine has cores, which must still give bit-identical results.
THREAD_COUNTS = (1, 2, 3)


def pytest_report_header(config):
    return (
        f"fastloss {fastloss.__version__}, openmp_enabled={fastloss.openmp_enabled()},"
        f" simd_level={fastloss.simd_level()}, numpy {np.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )


@pytest.fixture
def rng():
    return np.random.default_rng(20261204)
