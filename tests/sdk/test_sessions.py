"""Bash sessions: create_session / run_in_session / delete_session."""

import time
from datetime import timedelta

import pytest

from opensandbox.exceptions import SandboxApiException, SandboxException

from conftest import stderr_texts, stdout_texts


@pytest.fixture()
def session(aio, sandbox):
    sid = aio.run(sandbox.commands.create_session())
    yield sid
    try:
        aio.run(sandbox.commands.delete_session(sid))
    except SandboxException:
        pass


def run(aio, sandbox, sid, command, **kw):
    return aio.run(sandbox.commands.run_in_session(sid, command, **kw))


def test_session_id_and_init(aio, sandbox, session):
    assert isinstance(session, str) and session
    execution = run(aio, sandbox, session, "echo hello from session")
    assert stdout_texts(execution) == ["hello from session"]
    assert execution.exit_code == 0
    assert execution.error is None
    assert execution.complete is not None
    # the init event of a session run carries the session id
    assert execution.id == session


def test_cwd_and_exported_variables_persist(aio, sandbox, session):
    run(aio, sandbox, session, "mkdir -p /tmp/sess-dir && cd /tmp/sess-dir && export FOO=bar")
    execution = run(aio, sandbox, session, 'pwd; echo "$FOO"')
    assert stdout_texts(execution) == ["/tmp/sess-dir", "bar"]


def test_plain_variables_functions_and_aliases_persist(aio, sandbox, session):
    """execbox goes further than upstream: the whole shell state persists."""
    run(aio, sandbox, session, "PLAIN=not-exported")
    run(aio, sandbox, session, 'greet() { echo "hi $1"; }')
    run(aio, sandbox, session, "alias shout='echo ALIASED'")
    execution = run(aio, sandbox, session, 'echo "$PLAIN"; greet bob; shout now')
    assert stdout_texts(execution) == ["not-exported", "hi bob", "ALIASED now"]


def test_exit_code_in_session(aio, sandbox, session):
    run(aio, sandbox, session, "export KEEP=yes")
    execution = run(aio, sandbox, session, "sh -c 'exit 7'")
    assert execution.error is not None
    assert execution.error.name == "CommandExecError"
    assert execution.error.value == "7"
    assert execution.exit_code == 7
    assert execution.complete is None
    # the session survives a failing command, state intact
    after = run(aio, sandbox, session, 'echo "$KEEP"')
    assert stdout_texts(after) == ["yes"]
    assert after.exit_code == 0


def test_stderr_is_merged_and_blank_lines_dropped(aio, sandbox, session):
    execution = run(aio, sandbox, session, r"echo out; echo err >&2; printf 'a\n\nb\n'")
    assert stdout_texts(execution) == ["out", "err", "a", "b"]
    assert stderr_texts(execution) == []


def test_create_session_with_working_directory(aio, sandbox):
    sid = aio.run(sandbox.commands.create_session(working_directory="/tmp/sdk-sess/nested"))
    try:
        execution = run(aio, sandbox, sid, "pwd")
        assert stdout_texts(execution) == ["/tmp/sdk-sess/nested"]
    finally:
        aio.run(sandbox.commands.delete_session(sid))


def test_run_with_working_directory(aio, sandbox, session):
    execution = run(aio, sandbox, session, "pwd", working_directory="/tmp")
    assert stdout_texts(execution) == ["/tmp"]


def test_sessions_are_independent(aio, sandbox):
    a = aio.run(sandbox.commands.create_session())
    b = aio.run(sandbox.commands.create_session())
    try:
        assert a != b
        run(aio, sandbox, a, "export ONLY_A=1; cd /tmp")
        execution = run(aio, sandbox, b, 'echo "${ONLY_A-unset}"; pwd')
        assert stdout_texts(execution)[0] == "unset"
        assert stdout_texts(execution)[1] != "/tmp"
    finally:
        aio.run(sandbox.commands.delete_session(a))
        aio.run(sandbox.commands.delete_session(b))


def test_session_timeout(aio, sandbox, session):
    started = time.monotonic()
    execution = run(
        aio, sandbox, session, "echo before; sleep 30; echo after",
        timeout=timedelta(seconds=1),
    )
    assert time.monotonic() - started < 10
    assert stdout_texts(execution) == ["before"]
    assert execution.complete is None
    assert execution.exit_code != 0
    # still usable afterwards
    assert stdout_texts(run(aio, sandbox, session, "echo alive")) == ["alive"]


def test_delete_session(aio, sandbox):
    sid = aio.run(sandbox.commands.create_session())
    run(aio, sandbox, sid, "true")
    aio.run(sandbox.commands.delete_session(sid))
    with pytest.raises(SandboxApiException) as err:
        run(aio, sandbox, sid, "echo gone")
    assert err.value.status_code == 500
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.commands.delete_session(sid))
    assert err.value.status_code == 404
