"""The official E2B Python SDKs against a real `execbox serve`.

Run by crates/execbox/tests/e2b.rs with E2B_API_URL and E2B_SANDBOX_URL set to the server's
http://127.0.0.1:PORT and E2B_API_KEY to a key it was started with.
"""

import os

import pytest
from e2b import Sandbox


def pytest_configure(config):
    for name in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(name):
            raise pytest.UsageError(f"{name} must be set (see crates/execbox/tests/e2b.rs)")


@pytest.fixture
def sbx():
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()
