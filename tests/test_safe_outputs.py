"""Outputs never clobber special files: every atomic write (``vitkit.utils``) and ``vitkit export`` refuse a
destination that exists and is not a regular file, with one line naming the user's path (never the temporary
file); a symbolic link is written through to the file it names; export checks its destination before any work.

Device nodes are never written to here: ``/dev/null`` and ``/dev/full`` are only given to the check function."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from vitkit.utils import (
    OutputPathError,
    atomic_path,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
)

WRITERS = {
    "text": lambda p: atomic_write_text(p, "new"),
    "json": lambda p: atomic_write_json(p, {"a": 1}),
    "bytes": lambda p: atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"new")),
}


def _only_one_line_naming(message: str, path: Path | str) -> None:
    assert "\n" not in message and str(path) in message and ".tmp" not in message, message


@pytest.mark.parametrize("writer", list(WRITERS))
def test_fifo_destination_is_refused_and_kept(writer, tmp_path):
    fifo = tmp_path / "out.txt"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="FIFO") as info:
        WRITERS[writer](fifo)
    _only_one_line_naming(str(info.value), fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the pipe, not a regular file
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # no temporary file left


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_device_nodes_are_refused_by_the_check(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    with pytest.raises(OutputPathError, match="character device") as info:
        check_output_path(device)
    _only_one_line_naming(str(info.value), device)


def test_folder_destination_names_the_users_path(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for writer in WRITERS.values():
        with pytest.raises(OutputPathError, match="is a folder") as info:
            writer(folder)
        _only_one_line_naming(str(info.value), folder)
    with pytest.raises(OutputPathError, match="must name a file"):
        atomic_write_text(str(tmp_path) + "/", "x")
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["results"]


def test_a_socket_is_refused(tmp_path):
    import socket

    path = tmp_path / "s.json"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(OutputPathError, match="socket"):
            atomic_write_json(path, {})
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_errors_of_the_writer_name_the_destination_not_the_temporary_file(tmp_path):
    out = tmp_path / "model.bin"

    def full_disk(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as info:
        atomic_write(out, full_disk)
    assert info.value.filename == str(out) and info.value.errno == errno.ENOSPC
    _only_one_line_naming(f"{info.value.filename}: {info.value.strerror}", out)
    assert os.listdir(tmp_path) == []


def test_symbolic_links_are_written_through(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays a link
    assert target.read_text().strip().startswith("{") and stat.S_ISREG(os.lstat(target).st_mode)
    # a dangling link: the file it names is created
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "made.txt")
    atomic_write_text(dangling, "x")
    assert dangling.is_symlink() and (tmp_path / "made.txt").read_text() == "x"
    # a link to a FIFO is refused like the FIFO, naming the link and what it points at
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to_pipe").symlink_to(tmp_path / "pipe")
    with pytest.raises(OutputPathError, match="FIFO.*points at") as info:
        atomic_write_text(tmp_path / "to_pipe", "x")
    _only_one_line_naming(str(info.value), tmp_path / "to_pipe")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputPathError, match="loop"):
        atomic_write_text(loop, "x")


def test_missing_parent_is_refused_unless_asked_for(tmp_path):
    out = tmp_path / "missing" / "a.txt"
    with pytest.raises(OutputPathError, match="does not exist") as info, atomic_path(out, create_parent=False) as tmp:
        tmp.write_text("x")
    _only_one_line_naming(str(info.value), out)
    assert not (tmp_path / "missing").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputPathError, match="is not a folder"):
        check_output_path(blocker / "sub" / "a.onnx", create_parent=True)
    with pytest.raises(OutputPathError, match=r"must end in \.onnx"):
        check_output_path(tmp_path / "model.bin", suffixes=(".onnx",))
    assert check_output_path(tmp_path / "M.ONNX", suffixes=(".onnx",)) == tmp_path / "M.ONNX"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into any folder")
def test_unwritable_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(locked / "a.txt")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------------ vitkit export
def _export(argv: list[str], capsys) -> tuple[int, str, str]:
    from vitkit.cli import main

    code = main(["export", "onnx", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_export_checks_the_destination_before_loading_anything(tmp_path, capsys):
    missing_run = str(tmp_path / "no_such_run")  # loading it would fail: the destination must be refused first
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    blocker = tmp_path / "file"
    blocker.write_text("")
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    for dst, expected in ((fifo, "FIFO"), (tmp_path / "model.bin", "must end in .onnx"),
                          (folder, "is a folder"), (blocker / "sub" / "m.onnx", "is not a folder")):
        code, _, err = _export([missing_run, str(dst)], capsys)
        assert code == 2 and expected in err and "no_such_run" not in err, err
        _only_one_line_naming(err, dst)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_export_says_which_folder_it_created_and_removes_it_on_failure(tmp_path, capsys, monkeypatch):
    import torch

    import vitkit

    torch.manual_seed(0)
    vitkit.create_model("vit_fmnist_tiny", depth=1, embed_dim=16, num_heads=2).save_pretrained(tmp_path / "ck")
    out = tmp_path / "new" / "deeper" / "m.onnx"
    code, printed, err = _export([str(tmp_path / "ck"), str(out), "--no-check"], capsys)
    assert code == 0 and out.is_file(), err
    assert f"created the folder {out.parent}" in printed

    def failing(*args, **kwargs):
        raise RuntimeError("the exporter gave up")

    monkeypatch.setattr(torch.onnx, "export", failing)
    again = tmp_path / "other" / "m.onnx"
    code, _, err = _export([str(tmp_path / "ck"), str(again), "--no-check"], capsys)
    assert code == 2 and "the exporter gave up" in err
    assert not (tmp_path / "other").exists()  # the folder made for the file is gone with it
