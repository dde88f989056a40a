"""Golden streams: streams of every release, pinned with what they must decode to, forever.

Like CompressAI's tests/expected bitstreams. Each release folder under tests/golden/ holds
streams written by that release and an index.json:

    {"written_with": ..., "machine": ..., "streams": {NAME: {"codec": registry name,
      "bytes": n, "sha256": of the stream, "symbols_sha256": (CDC) of its int32 symbols,
      "pixels_sha256": {decode: sha256 of the uint8 pixels}}}}

UQDM decodes exactly everywhere, so every prefix's pixels are pinned by SHA-256. CDC's symbols
are exact (pinned by SHA-256); its pixels come from float decoders, so NAME.npz keeps them
(steps0, steps2) and a decode elsewhere may differ by tests.test_portability.PIXEL_BOUND levels.
UQDM streams use the seeded test model (its digest is pinned in uqdm-test.calibration.json):
users import the authors' weights themselves.

`python -m tests.golden_streams RELEASE` writes a release's folder (run once per release; run
again before the release, it adds the streams of newly added weights and keeps the others).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from model import Codec, load_codec

from .sample_images import photo_crop

GOLDEN = Path(__file__).with_name("golden")
CDC_DECODES = ("steps0", "steps2")


def sha256(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()


def symbols(codec: Codec, data: bytes) -> np.ndarray:
    z, k = codec.decode_symbols(data)
    return torch.cat([z.flatten(), k.flatten()]).numpy().astype(np.int64)


def decodes(codec: Codec, data: bytes) -> dict[str, np.ndarray]:
    """What a golden stream pins: every UQDM prefix; CDC's mean image and a 2-step decode."""
    if codec.progressive:
        return {f"chunks{n}": codec.decompress(data, chunks=n) for n in range(1, codec.n_chunks + 1)}
    return {"steps0": codec.decompress(data, steps=0), "steps2": codec.decompress(data, steps=2)}


#: what each release writes: name -> (codec, crop (top, left, height, width) of the sample photo)
SPEC = {
    "cdc-hp128-q0-48x80": ("cdc-hp128:q0", (100, 150, 48, 80)),
    "cdc-hp128-q4-64x64": ("cdc-hp128:q4", (200, 260, 64, 64)),
    "cdc-hp128-q7-33x70": ("cdc-hp128:q7", (330, 90, 33, 70)),
    "cdc-hp128-ctx-q1-64x96": ("cdc-hp128-ctx:q1", (150, 200, 64, 96)),
    "cdc-hp128-ctx-q6-40x50": ("cdc-hp128-ctx:q6", (260, 120, 40, 50)),
    "uqdm-test-64x100": ("uqdm-test", (120, 150, 64, 100)),
    "uqdm-test-1x1": ("uqdm-test", (50, 50, 1, 1)),
    "uqdm-test-20x30": ("uqdm-test", (300, 300, 20, 30)),
}


def write_release(release: str, spec: dict[str, tuple[str, tuple[int, int, int, int]]] = SPEC) -> Path:
    """Write the release's streams; in an existing folder only the names it lacks (weights added
    before the release): a stream once written is never rewritten."""
    folder = GOLDEN / release
    folder.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    old = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else None
    streams = dict(old["streams"]) if old else {}
    for name, (codec_name, crop) in spec.items():
        if name in streams:
            continue
        codec = load_codec(codec_name, device="cpu")
        data = codec.compress(photo_crop(*crop))
        (folder / f"{name}.bin").write_bytes(data)
        decoded = decodes(codec, data)
        entry = {"codec": codec_name, "bytes": len(data), "sha256": sha256(data),
                 "pixels_sha256": {k: sha256(v) for k, v in decoded.items()}}
        if not codec.progressive:
            entry["symbols_sha256"] = sha256(symbols(codec, data).astype("<i4"))
            np.savez_compressed(folder / f"{name}.npz", **decoded)
        streams[name] = entry
    written = {"written_with": f"diffpress {release} (commit {commit}, before the streams were added)",
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    index = {**(old or written), "streams": streams}
    if old and streams.keys() != old["streams"].keys():
        index.setdefault("added", []).append({**written, "names": sorted(streams.keys() - old["streams"].keys())})
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folder


if __name__ == "__main__":
    # the seeded test UQDM lives in a temporary weights folder, as the tests make it
    import os
    import tempfile

    from model.registry import save_weights

    from .uqdm_fixtures import TEST_NAME, seeded_exact_weights

    weights = Path(tempfile.mkdtemp())
    save_weights(seeded_exact_weights(), weights / f"{TEST_NAME}.safetensors")
    os.environ["DIFFPRESS_WEIGHTS"] = str(weights)
    print(f"wrote {write_release(sys.argv[1])}")
