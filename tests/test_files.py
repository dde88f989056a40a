"""model.files: local files written whole or not at all."""

from __future__ import annotations

import pytest

from model.files import atomic_path


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
