"""Control plane: create, connect, list, get_info, set_timeout, pause/resume, kill, errors."""

import datetime
import uuid

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    SandboxException,
    SandboxNotFoundException,
)


def test_create_with_timeout_metadata_and_envs():
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(timeout=600, metadata={"bar": "e2b x", "tag": tag}, envs={"A": "1"})
    try:
        assert sbx.sandbox_id
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"bar": "e2b x", "tag": tag}
        assert info.state == SandboxState.RUNNING
        left = (info.end_at - info.started_at).total_seconds()
        assert 590 <= left <= 610, left
    finally:
        assert sbx.kill() is True


def test_connect_returns_the_same_sandbox(sbx):
    other = Sandbox.connect(sbx.sandbox_id)
    assert other.sandbox_id == sbx.sandbox_id
    assert other.get_info().sandbox_id == sbx.sandbox_id


def test_set_timeout_moves_the_end(sbx):
    sbx.set_timeout(30)
    info = sbx.get_info()
    now = datetime.datetime.now(datetime.timezone.utc)
    assert (info.end_at - now).total_seconds() < 40
    sbx.set_timeout(900)
    info = sbx.get_info()
    assert (info.end_at - now).total_seconds() > 800


def test_list_filters_by_metadata_and_state_and_pages():
    tag = uuid.uuid4().hex
    made = [
        Sandbox.create(timeout=300, metadata={"tag": tag, "i": str(i), "odd": "k&=v x"})
        for i in range(3)
    ]
    try:
        query = SandboxQuery(metadata={"tag": tag, "odd": "k&=v x"})
        found = Sandbox.list(query=query).next_items()
        assert sorted(s.sandbox_id for s in found) == sorted(s.sandbox_id for s in made)
        assert all(s.metadata["tag"] == tag for s in found)

        only_one = Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "i": "1"})).next_items()
        assert [s.sandbox_id for s in only_one] == [made[1].sandbox_id]

        paused = Sandbox.list(
            query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])
        ).next_items()
        assert paused == []

        pager = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=2)
        first = pager.next_items()
        assert len(first) == 2
        assert pager.has_next
        second = pager.next_items()
        assert len(second) == 1
        assert not pager.has_next
        ids = [s.sandbox_id for s in first + second]
        assert sorted(ids) == sorted(s.sandbox_id for s in made)
        # Newest first by default (start times are whole seconds).
        starts = [s.started_at for s in first + second]
        assert starts == sorted(starts, reverse=True)
    finally:
        for s in made:
            s.kill()


def test_pause_and_resume(sbx):
    assert sbx.pause() is True
    assert sbx.get_info().state == SandboxState.PAUSED
    assert sbx.pause() is False  # already paused: 409
    tag_query = SandboxQuery(state=[SandboxState.PAUSED])
    assert sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list(query=tag_query).next_items()]
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert resumed.get_info().state == SandboxState.RUNNING


def test_kill_twice_is_false():
    sbx = Sandbox.create(timeout=120)
    assert sbx.kill() is True
    assert sbx.kill() is False
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_is_running_after_kill_is_false():
    sbx = Sandbox.create(timeout=120)
    sbx.kill()
    assert sbx.is_running() is False


def test_wrong_key_is_an_authentication_error():
    with pytest.raises(AuthenticationException):
        Sandbox.create(timeout=60, api_key="not-a-key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="not-a-key").next_items()


def test_unknown_sandbox_is_not_found():
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("no-such-sandbox")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("no-such-sandbox")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout("no-such-sandbox", 60)


def test_unknown_template_is_404():
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template", timeout=60)
    assert "404" in str(e.value)
    assert "template 'no-such-template' not found" in str(e.value)


def test_template_with_default_tag_and_bad_timeout():
    sbx = Sandbox.create("base:default", timeout=60)
    try:
        assert sbx.get_info().template_id == "base:default"
    finally:
        sbx.kill()
    with pytest.raises(SandboxException) as e:
        Sandbox.create(timeout=10**9)
    assert "400" in str(e.value) and "timeout" in str(e.value)


def test_unsupported_fields_are_refused_by_name():
    with pytest.raises(SandboxException) as e:
        Sandbox.create(timeout=60, network={"allow_public_traffic": False})
    assert "400" in str(e.value) and "allowPublicTraffic" in str(e.value)


def test_internet_access_false_is_a_deny_all_network():
    sbx = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        assert sbx.get_info().sandbox_id == sbx.sandbox_id
    finally:
        sbx.kill()


def test_metrics_are_one_sample_of_the_sandbox(sbx):
    metrics = sbx.get_metrics()
    assert len(metrics) == 1
    assert metrics[0].mem_total > 0
    assert metrics[0].cpu_count >= 1


def test_on_timeout_pause_pauses_instead_of_killing():
    import time

    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"})
    try:
        assert sbx.get_info().lifecycle["on_timeout"] == "pause"
        deadline = time.time() + 15
        while sbx.get_info().state != SandboxState.PAUSED:
            assert time.time() < deadline, "not paused at its timeout"
            time.sleep(0.5)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert resumed.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()


def test_network_rules_and_update_network():
    sbx = Sandbox.create(
        timeout=60, network={"allow_out": ["example.com"], "deny_out": ["0.0.0.0/0"]}
    )
    try:
        assert sbx.get_info().allow_internet_access is False
        sbx.update_network({"allow_out": ["pypi.org"]})
        sbx.update_network({})
    finally:
        sbx.kill()
    plain = Sandbox.create(timeout=60)
    try:
        with pytest.raises(SandboxException) as e:
            plain.update_network({"allow_out": ["pypi.org"]})
        assert "400" in str(e.value) and "without network" in str(e.value)
    finally:
        plain.kill()


def test_list_started_after_and_template(sbx):
    now = datetime.datetime.now(datetime.timezone.utc)
    earlier = SandboxQuery(started_after=now - datetime.timedelta(hours=1), template="base")
    assert sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list(query=earlier).next_items()]
    later = SandboxQuery(started_after=now + datetime.timedelta(hours=1))
    assert Sandbox.list(query=later).next_items() == []
    other = SandboxQuery(template="code-interpreter-v1")
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list(query=other).next_items()]
