"""Data plane, envd processes (needs the agent's /e2b/envd routes)."""

import time

import pytest
from e2b import CommandExitException


def test_run_streams_stdout_and_sees_envs(sbx):
    seen = []
    result = sbx.commands.run(
        "echo one; echo two; echo $A-$B", envs={"B": "2"}, on_stdout=seen.append
    )
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:2] == ["one", "two"]
    assert "".join(seen).splitlines()[:2] == ["one", "two"]


def test_sandbox_env_vars_reach_commands():
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=120, envs={"A": "from-create"})
    try:
        assert sbx.commands.run("echo $A").stdout.strip() == "from-create"
    finally:
        sbx.kill()


def test_nonzero_exit_raises(sbx):
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo oops >&2; exit 3")
    assert e.value.exit_code == 3
    assert "oops" in e.value.stderr


def test_cwd_and_user(sbx):
    assert sbx.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"
    assert sbx.commands.run("whoami", user="root").stdout.strip() == "root"


def test_background_wait_and_kill(sbx):
    handle = sbx.commands.run("sleep 0.5; echo done", background=True)
    assert handle.pid > 0
    result = handle.wait()
    assert result.stdout.strip() == "done"

    sleeper = sbx.commands.run("sleep 600", background=True)
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    assert sleeper.kill() is True
    with pytest.raises(CommandExitException):
        sleeper.wait()


def test_send_stdin(sbx):
    handle = sbx.commands.run("head -n 1", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello\n")
    assert handle.wait().stdout.strip() == "hello"


def test_is_running(sbx):
    assert sbx.is_running() is True


def test_stream_input_and_close_stdin(sbx):
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, iter(["a\n", "b\n"]))
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "a\nb\n"


def test_connect_to_a_running_command(sbx):
    handle = sbx.commands.run("sleep 1; echo late", background=True)
    again = sbx.commands.connect(handle.pid)
    assert again.wait().stdout.strip() == "late"


def test_pty(sbx):
    from e2b import PtySize

    out = bytearray()
    pty = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(pty.pid, b"echo $TERM; exit\n")
    pty.wait(on_pty=out.extend)
    assert b"xterm-256color" in bytes(out)


def test_traffic_resumes_an_auto_paused_sandbox():
    from e2b import Sandbox, SandboxState

    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        deadline = time.time() + 15
        while sbx.get_info().state != SandboxState.PAUSED:
            assert time.time() < deadline, "not paused at its timeout"
            time.sleep(0.5)
        assert sbx.commands.run("echo awake").stdout.strip() == "awake"
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()
