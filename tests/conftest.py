"""Suite-wide switches: golden-file updates, and no skips in CI.

In CI (CI=true) a skipped test is a failure: the privileged tests must run.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

# Fuzzers (tests/unit/test_*_fuzz.py) are deterministic: derandomized (the same
# examples on every run of the same code and the same selection of tests: hypothesis
# also draws constants from the project's modules that are loaded), no example
# database carried between runs,
# and no per-example deadline (timings are not asserted; a hang is caught by the
# subprocess timeouts the fuzzers set).
settings.register_profile("egress", derandomize=True, database=None, deadline=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "egress"))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.expected from the current output")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CI") and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI, which must run every test: {rep.longrepr}"
