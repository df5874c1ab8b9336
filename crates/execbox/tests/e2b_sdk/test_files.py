"""Data plane, envd files (needs the agent's /e2b/envd routes)."""

import httpx


def test_write_read_list(sbx):
    info = sbx.files.write("/home/user/dir/a.txt", "hello")
    assert info.path == "/home/user/dir/a.txt"
    assert sbx.files.read("/home/user/dir/a.txt") == "hello"
    assert sbx.files.read("dir/a.txt") == "hello"  # relative to the user's home
    names = [e.name for e in sbx.files.list("/home/user/dir")]
    assert names == ["a.txt"]


def test_make_dir_rename_remove_exists(sbx):
    assert sbx.files.make_dir("/home/user/d1/d2") is True
    assert sbx.files.make_dir("/home/user/d1/d2") is False
    sbx.files.write("/home/user/d1/x", b"\x00\x01")
    moved = sbx.files.rename("/home/user/d1/x", "/home/user/d1/d2/y")
    assert moved.path == "/home/user/d1/d2/y"
    assert sbx.files.exists("/home/user/d1/d2/y")
    assert not sbx.files.exists("/home/user/d1/x")
    assert sbx.files.read("/home/user/d1/d2/y", format="bytes") == b"\x00\x01"
    sbx.files.remove("/home/user/d1")
    assert not sbx.files.exists("/home/user/d1")


def test_write_files_and_missing_file(sbx):
    from e2b.exceptions import FileNotFoundException
    import pytest

    sbx.files.write_files(
        [{"path": "/tmp/m/1.txt", "data": "1"}, {"path": "/tmp/m/2.txt", "data": "2"}]
    )
    assert sbx.files.read("/tmp/m/2.txt") == "2"
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/tmp/m/none.txt")


def test_signed_upload_and_download_urls(sbx):
    up = sbx.upload_url("/home/user/up.txt")
    r = httpx.post(up, files={"file": ("up.txt", b"via url")})
    assert r.status_code == 200, r.text
    down = sbx.download_url("/home/user/up.txt")
    r = httpx.get(down)
    assert r.status_code == 200, r.text
    assert r.content == b"via url"
    # A signature for another path is refused.
    bad = down.replace("up.txt", "other.txt")
    assert httpx.get(bad).status_code == 401


def test_files_as_root_and_watch(sbx):
    sbx.files.write("/root/secret.txt", "r", user="root")
    assert sbx.files.read("/root/secret.txt", user="root") == "r"
    assert sbx.commands.run("stat -c %U /root/secret.txt", user="root").stdout.strip() == "root"

    sbx.files.make_dir("/home/user/watched")
    watcher = sbx.files.watch_dir("/home/user/watched")
    try:
        sbx.files.write("/home/user/watched/new.txt", "x")
        import time

        deadline = time.time() + 10
        names = set()
        while "new.txt" not in names:
            assert time.time() < deadline, names
            names |= {e.name for e in watcher.get_new_events()}
            time.sleep(0.3)
    finally:
        watcher.stop()
