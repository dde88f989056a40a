"""The shared data folder follows DIFFPRESS_SHARED everywhere it is used."""

from __future__ import annotations

import os
import subprocess
import sys

from model.paths import REPO


def test_diffpress_shared_moves_every_shared_path(tmp_path):
    script = ("from model import paths; from model.cdc.config import TrainConfig; "
              "print(paths.SHARED, paths.TRAIN_PHOTOS, paths.DEV_PHOTOS, paths.UQDM_TINY_SOURCE, "
              "TrainConfig(name='x', run_dir='r').data)")
    env = {**os.environ, "DIFFPRESS_SHARED": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [str(tmp_path), f"{tmp_path}/data/photos/train", f"{tmp_path}/data/photos/dev",
                   f"{tmp_path}/weights/uqdm-tiny", f"{tmp_path}/data/photos/train"]
