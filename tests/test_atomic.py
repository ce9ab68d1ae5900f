"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

from __future__ import annotations

import pytest

from raymim.atomic import TMP_PREFIX, atomic_write, write_text_atomic


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(TMP_PREFIX)
            tmp.write_text("half of the n")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_failure_before_the_first_write_creates_nothing(tmp_path):
    target = tmp_path / "quarantine.csv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target):
            raise KeyboardInterrupt  # Ctrl-C while the bytes are being produced
    assert list(tmp_path.iterdir()) == []


def test_binary_writer_through_the_temp_path(tmp_path):
    target = tmp_path / "shard.bin"
    with atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"\x00\x01"


def test_block_that_writes_nothing_is_an_error(tmp_path):
    # No temp file means nothing to commit: the target must not silently stay or vanish.
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_write(target):
            pass
    assert target.read_text() == "old"
