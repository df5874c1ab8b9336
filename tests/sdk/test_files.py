"""sandbox.files: upload/download, ranges, info, list/search, replace, permissions, move, delete."""

import hashlib
import io
import os

import pytest

from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.filesystem import (
    ContentReplaceEntry,
    DirectoryListEntry,
    MoveEntry,
    SearchEntry,
    SetPermissionEntry,
    WriteEntry,
)

from conftest import stdout_texts

ROOT = "/tmp/sdk-files"


def sh(aio, sandbox, command):
    execution = aio.run(sandbox.commands.run(command))
    assert execution.exit_code == 0, (command, execution.logs)
    return stdout_texts(execution)


def info(aio, sandbox, path):
    return aio.run(sandbox.files.get_file_info([path]))[path]


def test_write_and_read_text(aio, sandbox):
    path = f"{ROOT}/text/hello.txt"  # parent directories are created
    text = "Hello, files ✓\nsecond line\n"
    aio.run(sandbox.files.write_file(path, text, mode=644))
    assert aio.run(sandbox.files.read_file(path)) == text
    # the sandbox's own view agrees with the API
    assert sh(aio, sandbox, f"cat {path}") == ["Hello, files ✓", "second line"]
    assert sh(aio, sandbox, f"stat -c '%a %s' {path}") == [f"644 {len(text.encode())}"]


def test_binary_round_trip_and_overwrite(aio, sandbox):
    path = f"{ROOT}/bin/all-bytes.bin"
    data = bytes(range(256)) * 4
    aio.run(sandbox.files.write_file(path, data))
    assert aio.run(sandbox.files.read_bytes(path)) == data
    # overwriting truncates
    aio.run(sandbox.files.write_file(path, b"short"))
    assert aio.run(sandbox.files.read_bytes(path)) == b"short"


def test_file_written_by_command_is_readable(aio, sandbox):
    sh(aio, sandbox, f"mkdir -p {ROOT}/cmd && printf 'from-shell\\n' > {ROOT}/cmd/out.txt")
    assert aio.run(sandbox.files.read_file(f"{ROOT}/cmd/out.txt")) == "from-shell\n"


def test_ranged_and_line_reads(aio, sandbox):
    path = f"{ROOT}/range/digits.txt"
    content = "".join(f"line-{i}\n" for i in range(1, 11))
    aio.run(sandbox.files.write_file(path, content))
    first10 = aio.run(sandbox.files.read_file(path, range_header="bytes=0-9"))
    assert first10 == content[:10]
    assert len(first10) == 10
    tail = aio.run(sandbox.files.read_bytes(path, range_header="bytes=-7"))
    assert tail == content.encode()[-7:]
    lines = aio.run(sandbox.files.read_file(path, offset=2, limit=3))
    assert lines == "line-2\nline-3\nline-4"


def test_read_missing_file(aio, sandbox):
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.files.read_file(f"{ROOT}/does/not/exist"))
    assert err.value.status_code == 404


def test_write_files_with_modes_and_file_info(aio, sandbox):
    base = f"{ROOT}/modes"
    aio.run(
        sandbox.files.write_files(
            [
                WriteEntry(path=f"{base}/run.sh", data="#!/bin/sh\necho ran\n", mode=755),
                WriteEntry(path=f"{base}/plain.txt", data="plain", mode=644),
                WriteEntry(path=f"{base}/secret.txt", data="secret", mode=600),
            ]
        )
    )
    infos = aio.run(
        sandbox.files.get_file_info([f"{base}/run.sh", f"{base}/plain.txt", f"{base}/secret.txt"])
    )
    assert {p: i.mode for p, i in infos.items()} == {
        f"{base}/run.sh": 755,
        f"{base}/plain.txt": 644,
        f"{base}/secret.txt": 600,
    }
    plain = infos[f"{base}/plain.txt"]
    assert plain.path == f"{base}/plain.txt"
    assert plain.size == 5
    assert plain.entry_type == "file"
    assert plain.modified_at is not None and plain.created_at is not None
    # the executable bit is real
    assert sh(aio, sandbox, f"{base}/run.sh") == ["ran"]
    assert sh(aio, sandbox, f"stat -c '%a' {base}/run.sh {base}/plain.txt {base}/secret.txt") == [
        "755", "644", "600"
    ]


def test_owner_and_group(aio, sandbox):
    path = f"{ROOT}/owned/by-nobody.txt"
    aio.run(sandbox.files.write_file(path, "x", mode=640, owner="nobody", group="nogroup"))
    i = info(aio, sandbox, path)
    assert (i.owner, i.group, i.mode) == ("nobody", "nogroup", 640)
    assert sh(aio, sandbox, f"stat -c '%U %G %a' {path}") == ["nobody nogroup 640"]


def test_set_permissions(aio, sandbox):
    path = f"{ROOT}/perm/target.txt"
    aio.run(sandbox.files.write_file(path, "perm", mode=644))
    for mode in (755, 644, 600):
        aio.run(sandbox.files.set_permissions([SetPermissionEntry(path=path, mode=mode)]))
        assert info(aio, sandbox, path).mode == mode
        assert sh(aio, sandbox, f"stat -c '%a' {path}") == [str(mode)]

    aio.run(
        sandbox.files.set_permissions(
            [SetPermissionEntry(path=path, owner="nobody", group="nogroup", mode=600)]
        )
    )
    i = info(aio, sandbox, path)
    assert (i.owner, i.group, i.mode) == ("nobody", "nogroup", 600)
    assert sh(aio, sandbox, f"stat -c '%U %G %a' {path}") == ["nobody nogroup 600"]

    # an owner that does not exist is an error, not a silent chown to someone else
    with pytest.raises(SandboxException):
        aio.run(
            sandbox.files.set_permissions(
                [SetPermissionEntry(path=path, owner="no-such-user-xyz", mode=600)]
            )
        )
    assert sh(aio, sandbox, f"stat -c '%U' {path}") == ["nobody"]


def test_directories_list_and_search(aio, sandbox):
    base = f"{ROOT}/tree"
    aio.run(
        sandbox.files.create_directories(
            [WriteEntry(path=f"{base}/a/deep", mode=755), WriteEntry(path=f"{base}/b", mode=700)]
        )
    )
    aio.run(
        sandbox.files.write_files(
            [
                WriteEntry(path=f"{base}/top.txt", data="t"),
                WriteEntry(path=f"{base}/a/one.txt", data="1"),
                WriteEntry(path=f"{base}/a/deep/two.txt", data="2"),
                WriteEntry(path=f"{base}/b/three.py", data="3"),
            ]
        )
    )
    b = info(aio, sandbox, f"{base}/b")
    assert b.entry_type == "directory" and b.mode == 700

    depth1 = aio.run(sandbox.files.list_directory(DirectoryListEntry(path=base, depth=1)))
    assert [e.path for e in depth1] == [f"{base}/a", f"{base}/b", f"{base}/top.txt"]
    assert [e.entry_type for e in depth1] == ["directory", "directory", "file"]

    depth3 = aio.run(sandbox.files.list_directory(DirectoryListEntry(path=base, depth=3)))
    assert [e.path for e in depth3] == [
        f"{base}/a",
        f"{base}/a/deep",
        f"{base}/a/deep/two.txt",
        f"{base}/a/one.txt",
        f"{base}/b",
        f"{base}/b/three.py",
        f"{base}/top.txt",
    ]

    txt = aio.run(sandbox.files.search(SearchEntry(path=base, pattern="*.txt")))
    assert sorted(e.path for e in txt) == sorted(
        [f"{base}/top.txt", f"{base}/a/one.txt", f"{base}/a/deep/two.txt"]
    )
    assert all(e.entry_type == "file" for e in txt)
    none = aio.run(sandbox.files.search(SearchEntry(path=base, pattern="*.rs")))
    assert none == []


def test_replace_contents(aio, sandbox):
    a = f"{ROOT}/replace/a.txt"
    b = f"{ROOT}/replace/b.txt"
    aio.run(
        sandbox.files.write_files(
            [
                WriteEntry(path=a, data="foo bar foo baz foo", mode=640),
                WriteEntry(path=b, data="nothing to see"),
            ]
        )
    )
    results = aio.run(
        sandbox.files.replace_contents_detailed(
            [
                ContentReplaceEntry(path=a, old_content="foo", new_content="qux"),
                ContentReplaceEntry(path=b, old_content="foo", new_content="qux"),
            ]
        )
    )
    assert {r.path: r.replaced_count for r in results} == {a: 3, b: 0}
    assert aio.run(sandbox.files.read_file(a)) == "qux bar qux baz qux"
    assert aio.run(sandbox.files.read_file(b)) == "nothing to see"
    assert info(aio, sandbox, a).mode == 640  # mode kept

    aio.run(
        sandbox.files.replace_contents(
            [ContentReplaceEntry(path=a, old_content="bar", new_content="BAR")]
        )
    )
    assert aio.run(sandbox.files.read_file(a)) == "qux BAR qux baz qux"


def test_move_and_delete(aio, sandbox):
    src = f"{ROOT}/move/src.txt"
    dest = f"{ROOT}/move/new/parent/dest.txt"  # dest's parent is created
    aio.run(sandbox.files.write_file(src, "moving", mode=600))
    aio.run(sandbox.files.move_files([MoveEntry(src=src, dest=dest)]))
    assert aio.run(sandbox.files.read_file(dest)) == "moving"
    assert info(aio, sandbox, dest).mode == 600
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.files.get_file_info([src]))
    assert err.value.status_code == 404

    aio.run(sandbox.files.delete_files([dest, f"{ROOT}/move/never-existed.txt"]))
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.files.read_file(dest))
    assert err.value.status_code == 404

    aio.run(sandbox.files.delete_directories([f"{ROOT}/move"]))
    assert sh(aio, sandbox, f"test -e {ROOT}/move && echo present || echo absent") == ["absent"]


def test_create_and_delete_directories(aio, sandbox):
    d = f"{ROOT}/mkdir/x/y/z"
    aio.run(sandbox.files.create_directories([WriteEntry(path=d, mode=755)]))
    i = info(aio, sandbox, d)
    assert i.entry_type == "directory"
    assert i.mode == 755
    aio.run(sandbox.files.write_file(f"{d}/inside.txt", "x"))
    aio.run(sandbox.files.delete_directories([f"{ROOT}/mkdir"]))
    with pytest.raises(SandboxApiException) as err:
        aio.run(sandbox.files.get_file_info([f"{ROOT}/mkdir"]))
    assert err.value.status_code == 404


def test_large_file_round_trip(aio, sandbox):
    path = f"{ROOT}/large/blob.bin"
    data = os.urandom(20 * 1024 * 1024)
    aio.run(sandbox.files.write_file(path, data, mode=644), timeout=300)
    assert info(aio, sandbox, path).size == len(data)
    assert sh(aio, sandbox, f"sha256sum {path} | cut -d' ' -f1") == [
        hashlib.sha256(data).hexdigest()
    ]
    back = aio.run(sandbox.files.read_bytes(path), timeout=300)
    assert len(back) == len(data)
    assert back == data
    end = aio.run(
        sandbox.files.read_bytes(path, range_header=f"bytes={len(data) - 10}-{len(data) - 1}")
    )
    assert end == data[-10:]

    async def stream():
        chunks = []
        async for chunk in await sandbox.files.read_bytes_stream(path, chunk_size=1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    assert aio.run(stream(), timeout=300) == data
    aio.run(sandbox.files.delete_files([path]))


def test_upload_from_binary_stream(aio, sandbox):
    """WriteEntry.data may be a binary file object; the SDK streams it."""
    path = f"{ROOT}/stream/from-file-object.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    aio.run(sandbox.files.write_file(path, io.BytesIO(data), mode=600), timeout=300)
    i = info(aio, sandbox, path)
    assert (i.size, i.mode) == (len(data), 600)
    assert aio.run(sandbox.files.read_bytes(path), timeout=300) == data
