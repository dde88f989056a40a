"""Run in a child process by test_portability: decode streams, save every decode.

    python -m tests.portability_child STREAMS_DIR OUT.npz     (stdout: the kernels and threads used)
    python -m tests.portability_child --archive URL OUT.npz   (every record of an archive)
    python -m tests.portability_child --digests [UQDM_TINY_DIR]  (stdout: digests of weights made here)

The parent sets the CPU kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and the thread
count in the environment, the way another machine would differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def decodes(codec, data: bytes) -> dict[str, object]:
    """Every decode the portability tests compare: UQDM each prefix; CDC symbols and pixels."""
    if codec.progressive:
        return {f"chunks{n}": codec.decompress(data, chunks=n) for n in range(1, codec.n_chunks + 1)}
    z, k = codec.decode_symbols(data)
    return {"symbols": torch.cat([z.flatten(), k.flatten()]).numpy(),
            "steps0": codec.decompress(data, steps=0), "steps2": codec.decompress(data, steps=2),
            "stochastic": codec.decompress(data, steps=2, stochastic=True, seed=3)}


def main(folder: Path) -> dict[str, dict[str, object]]:
    from model import load_codec

    spec = json.loads((folder / "streams.json").read_text())
    out = {}
    for stream, codec_name in spec.items():
        codec = load_codec(codec_name, device="cpu")
        out[stream] = decodes(codec, (folder / stream).read_bytes())
    return out


def archive_decodes(url: str) -> dict[str, dict[str, object]]:
    from pipeline.archive import Archive

    archive = Archive(url)
    return {key: {"pixels": archive.decode(key)} for key in archive.keys()}


def made_weights_digests(uqdm_tiny: str | None) -> dict[str, str]:
    """Digests of the weights this process makes: the seeded test UQDM, a derived CDC rate point,
    and the authors' UQDM imported from `uqdm_tiny` when given."""
    from model.cdc.train import with_derived_rates
    from model.registry import read_weights, resolve
    from model.uqdm.importer import import_exact

    from .uqdm_fixtures import seeded_exact_weights

    cdc = with_derived_rates(read_weights(resolve("cdc-hp128")), [("q8", "q6", 1.7)], "a test")
    digests = {"uqdm-test": seeded_exact_weights().digest.hex(), "cdc-derived": cdc.digest.hex()}
    if uqdm_tiny:
        digests["uqdm-tiny"] = import_exact(uqdm_tiny).digest.hex()
    return digests


if __name__ == "__main__":
    if sys.argv[1] == "--digests":
        print(json.dumps(made_weights_digests(sys.argv[2] if len(sys.argv) > 2 else None)))
        sys.exit(0)
    results = archive_decodes(sys.argv[2]) if sys.argv[1] == "--archive" else main(Path(sys.argv[1]))
    np.savez(Path(sys.argv[-1]), **{f"{stream}|{name}": value for stream, found in results.items()
                                   for name, value in found.items()})
    print(json.dumps({"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}))
