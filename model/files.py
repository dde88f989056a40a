"""Local files written whole or not at all: model/'s one atomic-write helper (pipeline/ has its
own for fsspec locations, storage.Location.write_atomic, since model/ knows no storage).

    with atomic_path(target) as partial:    # a hidden file beside target
        save_file(tensors, str(partial))    # anything that writes to a path
    # now target holds the new file; after an exception it is unchanged and partial is gone

    with atomic_folder(checkpoint) as folder:   # the same for a folder of files (checkpoints);
        save_file(model, str(folder / "model.safetensors")); ...
    resume_from(recovered_folder(checkpoint))  # a swap cut off by a crash is undone first
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path to write `target` through; renamed onto it (readable by all with the
    default `mode`) only when the block ends without an exception. Same folder, so the rename
    is atomic on one filesystem."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield partial
        partial.chmod(mode)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A fresh folder to fill in place of `target`; swapped in when the block ends without an
    exception (the old folder set aside, then removed), else removed. A crash between the two
    renames leaves the old folder as `<target>.old`: `recovered_folder` puts it back."""
    target = recovered_folder(target)
    fresh, old = _beside(target, ".tmp"), _beside(target, ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    try:
        yield fresh
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    had_old = target.exists()
    if had_old:
        target.rename(old)
    try:
        fresh.rename(target)
    except OSError:
        if had_old:  # the old folder back under its name, not only as .old
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recovered_folder(target: str | Path) -> Path:
    """`target`, put back from `<target>.old` if an atomic_folder swap was cut off between its
    renames (call it before reading a checkpoint)."""
    target, old = Path(target), _beside(Path(target), ".old")
    if not target.exists() and old.is_dir():
        old.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _beside(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)
