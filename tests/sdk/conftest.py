"""Shared fixtures for driving a running execbox server through the official
``opensandbox`` Python SDK (PyPI).

Environment:
  OPEN_SANDBOX_DOMAIN   host:port of the execbox server (required), e.g. 127.0.0.1:18080
  OPEN_SANDBOX_API_KEY  optional; execbox on loopback without a key ignores it
  EXECBOX_SDK_IMAGE     optional image uri for created sandboxes (default "default")

The async SDK is driven from plain pytest functions through one session-wide
event loop (``aio.run(coro)``), so no pytest plugin is needed and module-scoped
sandboxes keep working across tests (httpx clients are bound to their loop).
"""

import asyncio
import os
import time

import pytest

from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

DOMAIN = os.environ.get("OPEN_SANDBOX_DOMAIN", "")
API_KEY = os.environ.get("OPEN_SANDBOX_API_KEY") or "execbox-loopback-ignores-this-key"
IMAGE = os.environ.get("EXECBOX_SDK_IMAGE", "default")

# Upper bound for any single SDK call made through ``aio.run``; a hang is a failure.
CALL_TIMEOUT_S = 180


def pytest_configure(config):
    if not DOMAIN:
        raise pytest.UsageError(
            "OPEN_SANDBOX_DOMAIN must name a running execbox server (host:port)"
        )


class Aio:
    """Runs coroutines on one long-lived event loop."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def run(self, coro, timeout: float = CALL_TIMEOUT_S):
        return self._runner.run(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self._runner.close()


@pytest.fixture(scope="session")
def aio():
    runner = Aio()
    yield runner
    runner.close()


def make_config(**kwargs) -> ConnectionConfig:
    """A fresh connection config, as the SDK README builds it."""
    return ConnectionConfig(domain=DOMAIN, api_key=API_KEY, **kwargs)


@pytest.fixture(scope="module")
def sandbox(aio):
    """One sandbox per test module, killed at the end."""
    sbx = aio.run(Sandbox.create(IMAGE, connection_config=make_config()))
    try:
        yield sbx
    finally:
        try:
            aio.run(sbx.kill())
        finally:
            aio.run(sbx.close())


def stdout_texts(execution) -> list[str]:
    return [m.text for m in execution.logs.stdout]


def stderr_texts(execution) -> list[str]:
    return [m.text for m in execution.logs.stderr]


async def wait_until(probe, timeout: float = 15.0, interval: float = 0.1):
    """Polls ``await probe()`` until it returns a truthy value; returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout}s (last value: {last!r})")
