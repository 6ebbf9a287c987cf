"""ggml_patch.staging.staged_dir: a directory appears whole or not at all (source tree, runtime, CUDA root,
lavapipe)."""
import stat

import pytest

from ggml_patch.staging import staged_dir


def test_success_replaces_the_old_directory_and_leaves_nothing_beside_it(tmp_path):
    dest = tmp_path / "rt"
    dest.mkdir()
    (dest / "old").write_text("old")
    with staged_dir(dest) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_a_failure_keeps_the_old_directory_and_removes_the_staged_one(tmp_path):
    dest = tmp_path / "rt"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(dest) as tmp:
            (tmp / "half").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in dest.iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]


def test_a_symlink_at_dest_is_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    dest = tmp_path / "out" / "rt"
    dest.parent.mkdir()
    dest.symlink_to(victim)
    with staged_dir(dest, mode=None) as tmp:
        (tmp / "new").write_text("new")
    assert not dest.is_symlink() and sorted(p.name for p in dest.iterdir()) == ["new"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700  # mode=None keeps mkdtemp's private mode
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    assert [p.name for p in dest.parent.iterdir()] == ["rt"]
