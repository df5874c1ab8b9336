"""sandbox.commands: foreground, background, status, logs, interrupt, envs, timeout."""

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.execd import ExecutionHandlers, RunCommandOpts

from conftest import stderr_texts, stdout_texts, wait_until


class Recorder:
    """ExecutionHandlers that count every event kind."""

    def __init__(self):
        self.events = []

    def handlers(self) -> ExecutionHandlers:
        def rec(kind):
            async def h(msg):
                self.events.append((kind, msg))
            return h

        return ExecutionHandlers(
            on_init=rec("init"),
            on_stdout=rec("stdout"),
            on_stderr=rec("stderr"),
            on_result=rec("result"),
            on_execution_complete=rec("complete"),
            on_error=rec("error"),
        )

    def kinds(self):
        return [k for k, _ in self.events]


def test_echo_exactly_one_event(aio, sandbox):
    rec = Recorder()
    execution = aio.run(
        sandbox.commands.run("echo Hello OpenSandbox E2E", handlers=rec.handlers())
    )
    assert stdout_texts(execution) == ["Hello OpenSandbox E2E"]
    assert stderr_texts(execution) == []
    assert execution.exit_code == 0
    assert execution.error is None
    assert execution.complete is not None
    assert execution.complete.execution_time_in_millis >= 0
    assert rec.kinds() == ["init", "stdout", "complete"]
    init = rec.events[0][1]
    assert init.id == execution.id and execution.id
    # timestamps are Unix milliseconds close to now
    now_ms = time.time() * 1000
    assert abs(execution.logs.stdout[0].timestamp - now_ms) < 60_000


def test_cwd(aio, sandbox):
    execution = aio.run(
        sandbox.commands.run("pwd", opts=RunCommandOpts(working_directory="/tmp"))
    )
    assert stdout_texts(execution) == ["/tmp"]
    assert execution.exit_code == 0


def test_cwd_that_does_not_exist_is_rejected(aio, sandbox):
    with pytest.raises(SandboxApiException) as err:
        aio.run(
            sandbox.commands.run(
                "pwd", opts=RunCommandOpts(working_directory="/no/such/dir/anywhere")
            )
        )
    assert err.value.status_code == 400


def test_failing_command(aio, sandbox):
    rec = Recorder()
    execution = aio.run(
        sandbox.commands.run("ls /definitely/not/here", handlers=rec.handlers())
    )
    assert execution.error is not None
    assert execution.error.name == "CommandExecError"
    assert execution.exit_code == int(execution.error.value)
    assert execution.exit_code == 2
    assert execution.complete is None
    assert "complete" not in rec.kinds()
    assert rec.kinds().count("error") == 1
    assert any("No such file or directory" in t for t in stderr_texts(execution))


def test_exit_code_and_unknown_command(aio, sandbox):
    e42 = aio.run(sandbox.commands.run("exit 42"))
    assert e42.exit_code == 42
    assert e42.error.value == "42"
    assert e42.error.traceback == ["exit status 42"]

    missing = aio.run(sandbox.commands.run("definitely-not-a-command-xyz"))
    assert missing.exit_code == 127
    assert any("command not found" in t for t in stderr_texts(missing))


def test_stdout_and_stderr_are_separate(aio, sandbox):
    execution = aio.run(
        sandbox.commands.run("echo to-out; echo to-err >&2; echo out-again")
    )
    assert stdout_texts(execution) == ["to-out", "out-again"]
    assert stderr_texts(execution) == ["to-err"]
    assert all(m.is_error for m in execution.logs.stderr)
    assert not any(m.is_error for m in execution.logs.stdout)


def test_blank_lines_are_kept(aio, sandbox):
    execution = aio.run(sandbox.commands.run(r"printf 'a\n\nb\n\n\nc\n'"))
    assert stdout_texts(execution) == ["a", "\n", "b", "\n", "\n", "c"]


def test_line_endings_and_partial_last_line(aio, sandbox):
    execution = aio.run(sandbox.commands.run(r"printf 'x\r\ny\rz\nno-newline'"))
    assert stdout_texts(execution) == ["x", "y", "z", "no-newline"]


def test_many_lines(aio, sandbox):
    execution = aio.run(sandbox.commands.run("seq 1 20000"))
    lines = stdout_texts(execution)
    assert len(lines) == 20000
    assert lines[0] == "1" and lines[-1] == "20000"
    assert lines == [str(i) for i in range(1, 20001)]


def test_envs(aio, sandbox):
    execution = aio.run(
        sandbox.commands.run(
            'echo "$GREETING|${EMPTY-unset}|$HOME_OVERRIDE"',
            opts=RunCommandOpts(
                envs={"GREETING": "hi there", "EMPTY": "", "HOME_OVERRIDE": "a=b c"}
            ),
        )
    )
    assert stdout_texts(execution) == ["hi there||a=b c"]

    # envs do not leak into later commands
    later = aio.run(sandbox.commands.run('echo "${GREETING-unset}"'))
    assert stdout_texts(later) == ["unset"]


def test_uid(aio, sandbox):
    execution = aio.run(
        sandbox.commands.run("id -u; id -g", opts=RunCommandOpts(uid=65534, gid=65534))
    )
    assert stdout_texts(execution) == ["65534", "65534"]


def test_timeout_kills_the_command(aio, sandbox):
    started = time.monotonic()
    execution = aio.run(
        sandbox.commands.run(
            "echo before; sleep 30; echo after",
            opts=RunCommandOpts(timeout=timedelta(seconds=1)),
        )
    )
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert stdout_texts(execution) == ["before"]
    assert execution.error is not None
    assert execution.error.name == "CommandExecError"
    assert execution.error.value == "-1"
    assert execution.exit_code == -1
    assert execution.complete is None


def test_background_sleep_status_logs_interrupt(aio, sandbox):
    started = time.monotonic()
    execution = aio.run(
        sandbox.commands.run("sleep 30", opts=RunCommandOpts(background=True))
    )
    assert time.monotonic() - started < 10
    assert execution.exit_code is None
    assert execution.error is None
    assert execution.id

    status = aio.run(sandbox.commands.get_command_status(execution.id))
    assert status.id == execution.id
    assert status.content == "sleep 30"
    assert status.running is True
    assert status.exit_code is None
    assert status.finished_at is None
    assert status.started_at is not None
    assert abs((datetime.now(timezone.utc) - status.started_at).total_seconds()) < 60

    logs = aio.run(sandbox.commands.get_background_command_logs(execution.id))
    assert logs.content == ""
    assert logs.cursor == 0

    aio.run(sandbox.commands.interrupt(execution.id))

    async def finished():
        s = await sandbox.commands.get_command_status(execution.id)
        return s if not s.running else None

    done = aio.run(wait_until(finished, timeout=8))
    assert done.exit_code == -1  # died from a signal
    # the wait error as upstream reports it: SIGTERM, or SIGKILL after the 3 s grace
    assert done.error in ("signal: terminated", "signal: killed"), done.error
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert time.monotonic() - started < 10  # interrupt did not wait for the 30 s sleep

    # interrupting a finished command is an error
    with pytest.raises(SandboxException):
        aio.run(sandbox.commands.interrupt(execution.id))


def test_background_logs_incremental(aio, sandbox):
    script = (
        "for i in 1 2 3; do echo line-$i; sleep 0.4; done; "
        "echo err-line >&2; printf 'ü-tail'; exit 3"
    )
    execution = aio.run(sandbox.commands.run(script, opts=RunCommandOpts(background=True)))

    async def collect():
        chunks = []
        cursor = None
        while True:
            status = await sandbox.commands.get_command_status(execution.id)
            logs = await sandbox.commands.get_background_command_logs(execution.id, cursor)
            assert logs.cursor is not None
            if cursor is not None:
                assert logs.cursor >= cursor
            chunks.append(logs.content)
            cursor = logs.cursor
            if not status.running and logs.content == "":
                return chunks, cursor, status
            await asyncio.sleep(0.2)

    chunks, cursor, status = aio.run(collect())
    full = "".join(chunks)
    assert full == "line-1\nline-2\nline-3\nerr-line\nü-tail"
    # The cursor is a byte offset into the combined output.
    assert cursor == len(full.encode())
    assert len([c for c in chunks if c]) >= 2, f"output not incremental: {chunks}"
    assert status.exit_code == 3
    assert status.running is False

    # Reading from 0 again returns everything; past the end returns nothing.
    again = aio.run(sandbox.commands.get_background_command_logs(execution.id, 0))
    assert again.content == full
    tail = aio.run(sandbox.commands.get_background_command_logs(execution.id, cursor + 100))
    assert tail.content == ""
    assert tail.cursor == cursor


def test_status_of_foreground_command(aio, sandbox):
    execution = aio.run(sandbox.commands.run("echo fg; exit 5"))
    status = aio.run(sandbox.commands.get_command_status(execution.id))
    assert status.running is False
    assert status.exit_code == 5
    assert status.content == "echo fg; exit 5"
    assert status.error == "exit status 5"


def test_unknown_command_id(aio, sandbox):
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.commands.get_command_status("0123456789abcdef0123456789abcdef"))
    assert err.value.status_code == 404


def test_interrupt_foreground_command(aio, sandbox):
    """Interrupt a running foreground command from a concurrent request."""
    ids = asyncio.Queue()

    async def on_init(init):
        await ids.put(init.id)

    async def main():
        run = asyncio.ensure_future(
            sandbox.commands.run(
                "echo started; sleep 30; echo finished",
                handlers=ExecutionHandlers(on_init=on_init),
            )
        )
        command_id = await asyncio.wait_for(ids.get(), 10)
        await asyncio.sleep(0.3)
        await sandbox.commands.interrupt(command_id)
        return await asyncio.wait_for(run, 10)

    started = time.monotonic()
    execution = aio.run(main())
    assert time.monotonic() - started < 10
    assert stdout_texts(execution) == ["started"]
    assert execution.error is not None and execution.error.name == "CommandExecError"
    assert execution.exit_code != 0
    assert execution.complete is None


def test_concurrent_commands(aio, sandbox):
    async def main():
        return await asyncio.gather(
            *[sandbox.commands.run(f"sleep 1; echo job-{i}") for i in range(4)]
        )

    started = time.monotonic()
    results = aio.run(main())
    elapsed = time.monotonic() - started
    assert [stdout_texts(r) for r in results] == [[f"job-{i}"] for i in range(4)]
    assert elapsed < 3.5, f"commands were serialized ({elapsed:.1f}s)"
