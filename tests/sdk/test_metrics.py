"""sandbox.get_metrics(): the sandbox's own limits and usage, not the host's."""

import time

from opensandbox import Sandbox
from opensandbox.models.execd import RunCommandOpts

from conftest import IMAGE, make_config, wait_until


def test_metrics_describe_the_sandbox(aio, sandbox):
    started = time.monotonic()
    m = aio.run(sandbox.get_metrics())
    elapsed = time.monotonic() - started

    # SDK default resources: cpu "1", memory "2Gi"
    assert m.cpu_count == 1
    assert abs(m.memory_total_in_mib - 2048) < 1, m.memory_total_in_mib
    assert 0 < m.memory_used_in_mib < m.memory_total_in_mib
    assert 0 <= m.cpu_used_percentage <= 100
    assert abs(m.timestamp - time.time() * 1000) < 60_000
    assert elapsed < 1.0, f"metrics took {elapsed:.2f}s; they must not block to sample"


def test_memory_usage_follows_the_sandbox(aio, sandbox):
    before = aio.run(sandbox.get_metrics()).memory_used_in_mib
    # /tmp is a tmpfs charged to the sandbox: 200 MiB of file data is sandbox memory
    fill = aio.run(sandbox.commands.run("head -c 200M /dev/zero > /tmp/metrics-ballast"))
    assert fill.exit_code == 0, fill.logs
    try:
        during = aio.run(sandbox.get_metrics()).memory_used_in_mib
        assert during - before >= 150, (before, during)
    finally:
        aio.run(sandbox.commands.run("rm -f /tmp/metrics-ballast"))

    async def released():
        m = await sandbox.get_metrics()
        return m.memory_used_in_mib < during - 100
    aio.run(wait_until(released, timeout=10))


def test_cpu_usage_follows_the_sandbox(aio, sandbox):
    busy = aio.run(
        sandbox.commands.run(
            "timeout 6 sh -c 'while :; do :; done'", opts=RunCommandOpts(background=True)
        )
    )
    try:
        async def busy_seen():
            m = await sandbox.get_metrics()
            return m if m.cpu_used_percentage > 25 else None
        m = aio.run(wait_until(busy_seen, timeout=5, interval=0.5))
        assert m.cpu_used_percentage <= 100
    finally:
        try:
            aio.run(sandbox.commands.interrupt(busy.id))
        except Exception:
            pass


def test_metrics_follow_the_requested_limits(aio):
    async def main():
        sbx = await Sandbox.create(
            IMAGE, connection_config=make_config(), resource={"cpu": "1", "memory": "512Mi"}
        )
        try:
            return await sbx.get_metrics()
        finally:
            await sbx.destroy()

    m = aio.run(main())
    assert abs(m.memory_total_in_mib - 512) < 1, m.memory_total_in_mib
    assert m.cpu_count == 1


def test_metrics_sync_client():
    from opensandbox import SandboxSync
    from opensandbox.config import ConnectionConfigSync
    from conftest import API_KEY, DOMAIN

    sbx = SandboxSync.create(
        IMAGE, connection_config=ConnectionConfigSync(domain=DOMAIN, api_key=API_KEY)
    )
    try:
        m = sbx.get_metrics()
    finally:
        sbx.destroy()
    assert m.cpu_count == 1
    assert abs(m.memory_total_in_mib - 2048) < 1
