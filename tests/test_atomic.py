"""paretoq_export.canonical.atomic: outputs appear complete or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from paretoq_export.canonical.atomic import atomic_dir, atomic_file, write_bytes_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_appears_whole_with_umask_permissions(tmp_path, umask_022):
    path = write_bytes_atomic(tmp_path / "sub" / "m.pte", b"abc")
    assert path.read_bytes() == b"abc" and _mode(path) == 0o644  # tempfile alone would leave 0600
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["m.pte"]


def test_failed_file_write_leaves_old_file_and_no_partial(tmp_path):
    path = write_bytes_atomic(tmp_path / "m.gguf", b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_dir_replaces_old_folder_and_failure_keeps_it(tmp_path, umask_022):
    out = tmp_path / "onnx"
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"v1")
    assert _mode(out) == 0o755 and (out / "model.onnx").read_bytes() == b"v1"
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"v2")
    assert (out / "model.onnx").read_bytes() == b"v2" and [p.name for p in tmp_path.iterdir()] == ["onnx"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (out / "model.onnx").read_bytes() == b"v2" and [p.name for p in tmp_path.iterdir()] == ["onnx"]
