"""Sandbox.create / Sandbox.connect / get_info / renew / kill through the SDK."""

from datetime import datetime, timedelta, timezone

import pytest

from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.manager import SandboxManager
from opensandbox.models.sandboxes import SandboxFilter

from conftest import IMAGE, make_config, stdout_texts


def test_create_connect_info_renew_kill(aio):
    async def main():
        out = {}
        created_at_client = datetime.now(timezone.utc)
        first = await Sandbox.create(
            IMAGE,
            connection_config=make_config(),
            env={"SDK_E2E_VAR": "from create"},
            metadata={"project": "sdk-e2e"},
        )
        second = None
        try:
            out["id"] = first.id
            out["info"] = await first.get_info()
            out["env"] = await first.commands.run('echo "$SDK_E2E_VAR"')
            await first.commands.run("echo written-by-first > /tmp/shared-marker")

            # A second, independent client attaches to the same sandbox by id.
            second = await Sandbox.connect(first.id, connection_config=make_config())
            out["second_id"] = second.id
            out["second_info"] = await second.get_info()
            out["seen_by_second"] = await second.commands.run("cat /tmp/shared-marker")

            async with await SandboxManager.create(connection_config=make_config()) as manager:
                page = await manager.list_sandbox_infos(
                    SandboxFilter(metadata={"project": "sdk-e2e"}, page_size=50)
                )
                out["listed"] = [i.id for i in page.sandbox_infos]

            before = datetime.now(timezone.utc)
            out["renewed"] = await second.renew(timedelta(minutes=20))
            out["renew_requested_at"] = before
            out["info_after_renew"] = await first.get_info()
        finally:
            await first.kill()
            await first.close()
        # After kill, the second client's calls fail instead of reaching a sandbox.
        try:
            out["after_kill"] = await second.commands.run("echo still here")
        except SandboxException as e:
            out["after_kill"] = e
        try:
            out["info_after_kill"] = await second.get_info()
        except SandboxApiException as e:
            out["info_after_kill"] = e
        await second.close()
        out["created_at_client"] = created_at_client
        return out

    out = aio.run(main())
    info = out["info"]

    assert info.id == out["id"]
    assert info.status.state == "Running"
    assert info.entrypoint == ["tail", "-f", "/dev/null"]
    assert info.image is not None and info.image.image == IMAGE
    assert info.metadata == {"project": "sdk-e2e"}
    # SDK default timeout is 10 minutes
    assert info.expires_at is not None
    lifetime = (info.expires_at - info.created_at).total_seconds()
    assert 590 <= lifetime <= 610, lifetime
    assert abs((info.created_at - out["created_at_client"]).total_seconds()) < 60

    assert stdout_texts(out["env"]) == ["from create"]

    assert out["second_id"] == out["id"]
    assert out["second_info"].id == out["id"]
    assert out["second_info"].status.state == "Running"
    assert stdout_texts(out["seen_by_second"]) == ["written-by-first"]
    assert out["id"] in out["listed"]

    expected = out["renew_requested_at"] + timedelta(minutes=20)
    assert abs((out["renewed"].expires_at - expected).total_seconds()) < 60
    assert abs((out["info_after_renew"].expires_at - out["renewed"].expires_at).total_seconds()) < 2

    after = out["after_kill"]
    assert isinstance(after, SandboxException) or after.exit_code != 0, after
    info_after = out["info_after_kill"]
    if isinstance(info_after, SandboxApiException):
        assert info_after.status_code == 404
    else:
        assert info_after.status.state in ("Stopping", "Terminated"), info_after.status


def test_connect_unknown_sandbox_fails(aio):
    async def main():
        try:
            sbx = await Sandbox.connect(
                "00000000-0000-4000-8000-000000000000",
                connection_config=make_config(),
                connect_timeout=timedelta(seconds=5),
            )
        except SandboxException as e:
            return e
        await sbx.close()
        return None

    err = aio.run(main())
    assert err is not None, "connect to an unknown sandbox id succeeded"


def test_use_server_proxy_mode(aio):
    """With use_server_proxy=True the SDK sends the API key on execd calls too and
    uploads with Content-Length instead of chunked encoding; execbox serves both."""
    from opensandbox.models.filesystem import WriteEntry

    async def main():
        sbx = await Sandbox.create(IMAGE, connection_config=make_config(use_server_proxy=True))
        try:
            ran = await sbx.commands.run("echo via-server-proxy")
            await sbx.files.write_files(
                [WriteEntry(path="/tmp/proxied.bin", data=bytes(range(256)) * 64, mode=600)]
            )
            back = await sbx.files.read_bytes("/tmp/proxied.bin")
            return ran, back
        finally:
            await sbx.destroy()

    ran, back = aio.run(main())
    assert stdout_texts(ran) == ["via-server-proxy"]
    assert back == bytes(range(256)) * 64
