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


def test_stale_siblings_of_dead_processes_are_removed(tmp_path):
    from paretoq_export.canonical.atomic import remove_stale_siblings

    dead = 2**22 + 777  # above the default pid_max: no such process
    stale = [f".m.gguf.partial-{dead}-ab12", ".m.gguf.partial-x1y2", f".m.gguf.old-{dead}"]
    kept = [f".m.gguf.partial-{os.getpid()}-cd34", ".other.gguf.partial-x1y2", "m.gguf"]
    for name in stale + kept:
        (tmp_path / name).mkdir() if "old" in name else (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_siblings(tmp_path / "m.gguf")) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    with atomic_file(tmp_path / "other.gguf") as tmp:  # every atomic write cleans up after its own name
        tmp.write_bytes(b"new")
    assert ".other.gguf.partial-x1y2" not in {p.name for p in tmp_path.iterdir()}


def test_check_output_refuses_before_any_work(tmp_path):
    from paretoq_export.canonical.atomic import OutputError, check_output

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="exists: pass --overwrite"):
        check_output(tmp_path / "file", overwrite=False)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "sub" / "ck", overwrite=False)
    with pytest.raises(OutputError, match="is a folder, --overwrite would replace it with a file"):
        check_output(tmp_path / "empty", overwrite=True)
    assert check_output(tmp_path / "empty", overwrite=False, folder=True) == tmp_path / "empty"
    assert check_output(tmp_path / "new" / "deeper" / "m.gguf", overwrite=False)
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_overwriting_a_file_with_a_folder_leaves_no_old_sibling(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file in the way")
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"v1")
    assert (out / "model.onnx").read_bytes() == b"v1" and [p.name for p in tmp_path.iterdir()] == ["out"]
