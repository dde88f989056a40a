"""UQDM encode/decode MP/s on one 384x256 dev-photo crop, runnable from any checkout: the
before/after of the exact codec (issue "Portable archives"). Prints one JSON line.

    python benchmarks/uqdm_speed_compare.py uqdm-tiny-exact2 2                # this checkout, 2 threads
    git worktree add /tmp/float 25f0813 && cd /tmp/float && \\
        DIFFPRESS_WEIGHTS=DIR python /path/to/this/file uqdm-tiny 2          # the float codec it replaced

(DIR: the float weights that commit's `python -m jobs.import_uqdm` writes.) It imports `model`
from the current directory, so it measures whichever checkout it is run from.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, ".")
from model import load_codec  # noqa: E402 - from the checkout in the current directory

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(name: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    photo = SHARED / "data" / "photos" / "dev" / "Bridge_by_Sander_Klootwijk.png"
    img = np.asarray(Image.open(photo).convert("RGB"))[:256, :384]
    codec = load_codec(name, device="cpu")
    codec.compress(img[:64, :64])  # warm-up
    megapixels = img.shape[0] * img.shape[1] / 1e6
    started = time.perf_counter()
    data = codec.compress(img)
    row = {"codec": name, "threads": threads, "encode_mp_s": megapixels / (time.perf_counter() - started)}
    for chunks in (1, 5):
        started = time.perf_counter()
        codec.decompress(data, chunks=chunks)
        row[f"decode_{chunks}_chunks_mp_s"] = megapixels / (time.perf_counter() - started)
    return row


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
