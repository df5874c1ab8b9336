"""The opensandbox SDK README examples, copied the way a new user would, pointed at execbox.

Only the connection values (domain, api key) and the image name differ from the README.
"""

import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from conftest import API_KEY, DOMAIN, IMAGE, stdout_texts


# ---------------------------------------------------------------- Quick Start (async)

def test_quick_start_async(aio):
    from opensandbox.sandbox import Sandbox
    from opensandbox.config import ConnectionConfig
    from opensandbox.exceptions import SandboxException

    printed = []

    async def main():
        # 1. Configure connection
        config = ConnectionConfig(domain=DOMAIN, api_key=API_KEY)

        # 2. Create a Sandbox
        sandbox = await Sandbox.create(IMAGE, connection_config=config)
        printed.append(sandbox.id)
        try:
            # 3. Execute a shell command
            execution = await sandbox.commands.run("echo 'Hello Sandbox!'")

            # 4. Print output
            printed.append(execution.logs.stdout[0].text)
            printed.append(execution)
        finally:
            # 5. Terminate the remote sandbox and close local resources
            await sandbox.destroy()

    aio.run(main())

    sandbox_id, first_line, execution = printed
    assert first_line == "Hello Sandbox!"
    assert stdout_texts(execution) == ["Hello Sandbox!"]
    assert execution.exit_code == 0
    assert execution.error is None
    assert execution.logs.stderr == []
    assert execution.text == "Hello Sandbox!"

    # destroy() really terminated the remote sandbox: the lifecycle API no longer
    # reports it as running.
    _assert_sandbox_gone(aio, sandbox_id)


def _assert_sandbox_gone(aio, sandbox_id):
    from opensandbox.manager import SandboxManager
    from opensandbox.config import ConnectionConfig
    from opensandbox.exceptions import SandboxApiException

    async def probe():
        async with await SandboxManager.create(
            connection_config=ConnectionConfig(domain=DOMAIN, api_key=API_KEY)
        ) as manager:
            try:
                info = await manager.get_sandbox_info(sandbox_id)
            except SandboxApiException as e:
                return ("error", e.status_code)
            return ("state", info.status.state)

    outcome = aio.run(probe())
    assert outcome in {
        ("error", 404),
        ("state", "Stopping"),
        ("state", "Terminated"),
    }, outcome


# ---------------------------------------------------------------- Quick Start (sync)

def test_quick_start_sync():
    from opensandbox import SandboxSync
    from opensandbox.config import ConnectionConfigSync

    config = ConnectionConfigSync(
        domain=DOMAIN,
        api_key=API_KEY,
        request_timeout=timedelta(seconds=30),
        transport=httpx.HTTPTransport(limits=httpx.Limits(max_connections=20)),
    )

    sandbox = SandboxSync.create(IMAGE, connection_config=config)
    try:
        execution = sandbox.commands.run("echo 'Hello Sandbox!'")
        assert execution.logs.stdout[0].text == "Hello Sandbox!"
        assert execution.exit_code == 0

        # The sync client sees the same sandbox as the lifecycle API.
        info = sandbox.get_info()
        assert info.id == sandbox.id
        assert info.status.state == "Running"
    finally:
        sandbox.destroy()
        config.transport.close()


# ------------------------------------------- 3. Command Execution & Streaming (handlers)

def test_command_streaming_with_handlers(aio, sandbox):
    from opensandbox.models.execd import ExecutionHandlers

    seen_stdout = []
    seen_stderr = []
    completes = []

    async def handle_stdout(msg):
        seen_stdout.append((msg.text, time.monotonic()))

    async def handle_stderr(msg):
        seen_stderr.append(msg.text)

    async def handle_complete(complete):
        completes.append(complete.execution_time_in_millis)

    handlers = ExecutionHandlers(
        on_stdout=handle_stdout,
        on_stderr=handle_stderr,
        on_execution_complete=handle_complete,
    )

    result = aio.run(
        sandbox.commands.run(
            'for i in {1..5}; do echo "Count $i"; sleep 0.5; done',
            handlers=handlers,
        )
    )

    assert [t for t, _ in seen_stdout] == [f"Count {i}" for i in range(1, 6)]
    assert seen_stderr == []
    assert stdout_texts(result) == [f"Count {i}" for i in range(1, 6)]
    assert result.exit_code == 0
    assert len(completes) == 1
    # five half-second sleeps ran inside the sandbox
    assert completes[0] >= 2000, completes
    # Output arrives while the command runs (the proxy streams, it does not buffer
    # the whole response): the first and last line reach the client ~2 s apart.
    spread = seen_stdout[-1][1] - seen_stdout[0][1]
    assert spread >= 1.5, f"lines arrived within {spread:.2f}s: output was buffered"


# ---------------------------------------------------- 4. Comprehensive File Operations

def test_file_operations(aio, sandbox):
    from opensandbox.models.filesystem import WriteEntry, SearchEntry

    async def main():
        # 1. Write file
        await sandbox.files.write_files([
            WriteEntry(
                path="/tmp/hello.txt",
                data="Hello World",
                mode=644
            )
        ])

        # 2. Read file
        content = await sandbox.files.read_file("/tmp/hello.txt")

        # 3. List/Search files
        files = await sandbox.files.search(
            SearchEntry(
                path="/tmp",
                pattern="*.txt"
            )
        )
        found = [f.path for f in files]

        # 4. Delete file
        await sandbox.files.delete_files(["/tmp/hello.txt"])

        after = await sandbox.files.search(SearchEntry(path="/tmp", pattern="hello.txt"))
        return content, found, after

    content, found, after = aio.run(main())
    assert content == "Hello World"
    assert "/tmp/hello.txt" in found
    assert all(p.endswith(".txt") for p in found), found
    assert after == []


# ----------------------------------------------------------- 1. Lifecycle Management

def test_lifecycle_management(aio):
    from opensandbox.sandbox import Sandbox
    from opensandbox.config import ConnectionConfig

    config = ConnectionConfig(domain=DOMAIN, api_key=API_KEY)

    async def main():
        sandbox = await Sandbox.create(IMAGE, connection_config=config)
        resumed = None
        try:
            await sandbox.commands.run("echo kept > /tmp/state-across-pause")

            # Renew the sandbox
            # This resets the expiration time to (current time + duration)
            renewed = await sandbox.renew(timedelta(minutes=30))

            # Pause execution (suspends all processes)
            await sandbox.pause()
            paused = await sandbox.get_info()

            # Resume execution
            resumed = await Sandbox.resume(
                sandbox_id=sandbox.id,
                connection_config=config,
            )

            # Get current status
            info = await resumed.get_info()
            kept = await resumed.commands.run("cat /tmp/state-across-pause")
            return renewed, paused, info, kept
        finally:
            await sandbox.kill()
            await sandbox.close()
            if resumed is not None:
                await resumed.close()

    renewed, paused, info, kept = aio.run(main())
    now = datetime.now(timezone.utc)
    assert abs((renewed.expires_at - (now + timedelta(minutes=30))).total_seconds()) < 120
    assert paused.status.state == "Paused"
    assert info.status.state == "Running"
    assert info.expires_at is not None
    assert abs((info.expires_at - renewed.expires_at).total_seconds()) < 2
    assert stdout_texts(kept) == ["kept"]


def test_non_expiring_sandbox(aio):
    """README: 'Create a non-expiring sandbox by omitting `timeout`' (timeout=None)."""
    from opensandbox.sandbox import Sandbox
    from opensandbox.config import ConnectionConfig

    async def main():
        manual = await Sandbox.create(
            IMAGE,
            connection_config=ConnectionConfig(domain=DOMAIN, api_key=API_KEY),
            timeout=None,
        )
        try:
            return await manual.get_info()
        finally:
            await manual.destroy()

    info = aio.run(main())
    assert info.status.state == "Running"
    assert info.expires_at is None


# ------------------------------------------- the same services through the sync client

def test_sync_client_commands_files_sessions():
    from opensandbox import SandboxSync
    from opensandbox.config import ConnectionConfigSync
    from opensandbox.models.execd import RunCommandOpts
    from opensandbox.models.filesystem import WriteEntry

    sandbox = SandboxSync.create(
        IMAGE, connection_config=ConnectionConfigSync(domain=DOMAIN, api_key=API_KEY)
    )
    try:
        bg = sandbox.commands.run("echo sync-bg", opts=RunCommandOpts(background=True))
        assert bg.exit_code is None

        sandbox.files.write_files([WriteEntry(path="/tmp/sync.txt", data="sync data", mode=600)])
        assert sandbox.files.read_file("/tmp/sync.txt") == "sync data"
        assert sandbox.files.get_file_info(["/tmp/sync.txt"])["/tmp/sync.txt"].mode == 600

        sid = sandbox.commands.create_session()
        sandbox.commands.run_in_session(sid, "cd /tmp && export SYNC=1")
        execution = sandbox.commands.run_in_session(sid, 'pwd; echo "$SYNC"')
        assert stdout_texts(execution) == ["/tmp", "1"]
        sandbox.commands.delete_session(sid)

        deadline = time.monotonic() + 10
        while sandbox.commands.get_command_status(bg.id).running:
            assert time.monotonic() < deadline, "background echo never finished"
            time.sleep(0.1)
        logs = sandbox.commands.get_background_command_logs(bg.id)
        assert logs.content == "sync-bg\n"
    finally:
        sandbox.destroy()
