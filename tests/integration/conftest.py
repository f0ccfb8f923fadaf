"""Integration tests: root, a real kernel, network namespaces.

Without root or the tools they need these tests skip on a workstation, but
FAIL when $CI is set: a CI run that silently skipped every kernel test would
prove nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil

import pytest

from egress_agent.lab.topology import Lab

REQUIRED_TOOLS = ("nft", "ip", "nsenter", "conntrack")


def _missing_requirements() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    return missing + [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def kernel_environment() -> None:
    missing = _missing_requirements()
    if missing:
        reason = f"integration tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)


@pytest.fixture
def lab() -> Lab:
    """A fresh lab with a random prefix, always torn down."""
    lab = Lab("eat" + secrets.token_hex(2))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
