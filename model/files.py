"""Local files written whole or not at all: model/'s one atomic-write helper (pipeline/ has its
own for fsspec locations, storage.Location.write_atomic, since model/ knows no storage).

    with atomic_path(target) as partial:    # a hidden file beside target
        save_file(tensors, str(partial))    # anything that writes to a path
    # now target holds the new file; after an exception it is unchanged and partial is gone
"""

from __future__ import annotations

import contextlib
import os
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
