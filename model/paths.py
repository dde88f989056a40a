"""Where the team's shared data lives (photos, the authors' UQDM checkpoint).

SHARED is $DIFFPRESS_SHARED, or the `shared` folder beside this checkout (../shared).
Nothing in it is copied into the repository; the tests, training and benchmarks read it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFPRESS_SHARED") or REPO.parent / "shared")
PHOTOS = SHARED / "data" / "photos"
TRAIN_PHOTOS = PHOTOS / "train"   # for training and fine-tuning
DEV_PHOTOS = PHOTOS / "dev"       # 12 PNGs for evaluation and tests; never train on them
UQDM_TINY_SOURCE = SHARED / "weights" / "uqdm-tiny"   # the authors' config.json + checkpoint.pt
GOLDEN = SHARED / "golden"             # streams written on other machines, with what those decoded
