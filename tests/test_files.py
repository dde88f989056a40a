"""model.files: local files written whole or not at all."""

from __future__ import annotations

import pytest

from model.files import atomic_folder, atomic_path, recovered_folder


def test_atomic_path_replaces_the_target_whole_or_leaves_it_untouched(tmp_path):
    target = tmp_path / "sub" / "weights.safetensors"
    with atomic_path(target) as partial:
        partial.write_bytes(b"first")
        assert not target.exists()  # nothing under the final name before the block ends
    assert target.read_bytes() == b"first" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"first" and [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]


def test_atomic_folder_swaps_in_the_new_folder_or_keeps_the_old_one(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    for step in ("1", "2"):
        with atomic_folder(checkpoint) as fresh:
            (fresh / "state.json").write_text(step)
            assert not (checkpoint / "state.json").exists() or (checkpoint / "state.json").read_text() != step
    assert (checkpoint / "state.json").read_text() == "2"
    with pytest.raises(KeyboardInterrupt), atomic_folder(checkpoint) as fresh:
        (fresh / "state.json").write_text("3")
        raise KeyboardInterrupt
    assert (checkpoint / "state.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_cut_off_between_its_renames_is_undone_before_the_next_read(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    with atomic_folder(checkpoint) as fresh:
        (fresh / "state.json").write_text("7")
    checkpoint.rename(tmp_path / "checkpoint.old")   # the state a crash between the renames leaves
    (tmp_path / "checkpoint.tmp").mkdir()
    assert (recovered_folder(checkpoint) / "state.json").read_text() == "7"
    assert not (tmp_path / "checkpoint.old").exists()
