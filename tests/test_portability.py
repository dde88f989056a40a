"""Portable archives: a stream decodes the same on other CPU kernels, thread counts and batch sizes,
and weights made from the same sources (an import, the seeded test model, a derived rate) come out
with one digest on every kernel.

Streams are written in this process with the default kernels; child processes forced onto
other kernels (the way a machine of another generation or vendor runs them) decode them.
UQDM (lossless and every prefix) and CDC's symbols must come back identical; CDC's pixels
come from float decoders and may differ by at most PIXEL_BOUND levels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest

from model import decode_image, load_codec
from model.paths import UQDM_TINY_SOURCE
from model.uqdm.codec import UQDMCodec
from model.uqdm.importer import CALIBRATION

from pipeline.archive import Archive
from pipeline.compress import CompressConfig, run_compress

from .pipeline_fixtures import build_dataset, local_ray  # noqa: F401 - fixture
from .conftest import HOW_TO_PROVIDE
from .portability_child import decodes
from .uqdm_fixtures import CALIBRATION as UQDM_TEST_CALIBRATION

REPO = Path(__file__).resolve().parents[1]
#: the kernels a machine of another generation or vendor would run
KERNELS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "scalar-sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
#: CDC's decoded pixels come from float networks: at most this many levels apart on other kernels
PIXEL_BOUND = 2
EXACT = ("chunks", "symbols")
#: what a test expects per codec of an archive's records: UQDM exact, CDC within PIXEL_BOUND
ARCHIVE_CODECS = {"uqdm-test": "chunks", "cdc-hp128:q2": "pixels"}


def photo(height: int, width: int, top: int = 120, left: int = 150) -> np.ndarray:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return decode_image(Path(path).read_bytes())[0][top:top + height, left:left + width]


@pytest.fixture(scope="module")
def streams(tmp_path_factory, weights_dir, uqdm, cdc) -> tuple[Path, dict]:
    """Streams written here, and every decode of them here."""
    folder = tmp_path_factory.mktemp("streams")
    one_tile_groups = UQDMCodec(uqdm.weights, device="cpu", tile_batch=1)
    spec = {"uqdm-b2.bin": (uqdm, "uqdm-test", photo(64, 100)),                 # 2 tiles, one segment
            "uqdm-b1.bin": (one_tile_groups, "uqdm-test", photo(64, 100)),      # the same, one tile a segment
            "cdc-q1.bin": (load_codec("cdc-hp128:q1", device="cpu"), "cdc-hp128:q1", photo(70, 130)),
            # q7: a derived rate point (q6's gains x 1.4), the largest z and y symbols shipped
            "cdc-q7.bin": (load_codec("cdc-hp128:q7", device="cpu"), "cdc-hp128:q7", photo(70, 130, 300, 60)),
            # the context entropy model: its passes' tables come from exact integer nets too
            "cdc-ctx-q2.bin": (load_codec("cdc-hp128-ctx:q2", device="cpu"), "cdc-hp128-ctx:q2", photo(70, 130, 200, 90))}
    expected = {}
    for stream, (codec, name, img) in spec.items():
        data = codec.compress(img)
        (folder / stream).write_bytes(data)
        expected[stream] = decodes(codec, data)
    (folder / "streams.json").write_text(json.dumps({s: name for s, (_, name, _) in spec.items()}))
    return folder, expected


def decode_elsewhere(source: Path | str, env: dict[str, str], out: Path, archive: bool = False
                     ) -> dict[str, dict[str, np.ndarray]]:
    what = ["--archive", str(source)] if archive else [str(source)]
    result = subprocess.run([sys.executable, "-m", "tests.portability_child", *what, str(out)],
                            cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads(result.stdout.strip().splitlines()[-1])
    assert used["threads"] == int(env["OMP_NUM_THREADS"])
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in np.load(out).items():
        stream, name = key.split("|")
        found.setdefault(stream, {})[name] = value
    return found


def assert_same_decodes(expected: dict, found: dict) -> None:
    assert found.keys() == expected.keys()
    for stream, decoded in expected.items():
        assert found[stream].keys() == decoded.keys(), stream
        for name, here in decoded.items():
            there = found[stream][name]
            if name.startswith(EXACT):
                np.testing.assert_array_equal(there, here, err_msg=f"{stream} {name}")
            else:
                difference = np.abs(there.astype(np.int16) - here.astype(np.int16)).max()
                assert difference <= PIXEL_BOUND, f"{stream} {name}: pixels {difference} levels apart"


# Every kernel setting, and each thread count under two of them (a child process costs ~1 minute).
@pytest.mark.parametrize("kernels,threads", [("avx2", 1), ("scalar", 2), ("onednn-avx2", 2), ("scalar-sse41", 1)])
def test_streams_decode_alike_on_other_kernels_and_thread_counts(streams, kernels, threads, tmp_path):
    folder, expected = streams
    env = {**KERNELS[kernels], "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    assert_same_decodes(expected, decode_elsewhere(folder, env, tmp_path / "found.npz"))


def digests_elsewhere(env: dict[str, str], uqdm_tiny: Path | None = None) -> dict[str, str]:
    command = [sys.executable, "-m", "tests.portability_child", "--digests"] + ([str(uqdm_tiny)] if uqdm_tiny else [])
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_weights_made_here_get_one_digest_on_every_kernel():
    """The seeded test UQDM (hash-initialized, quantized as an import does) and a derived CDC rate
    point: the recorded digest, in processes on every kernel setting."""
    recorded = json.loads(UQDM_TEST_CALIBRATION.read_text())["digest"]
    found = {name: digests_elsewhere(env) for name, env in KERNELS.items()}
    assert {d["uqdm-test"] for d in found.values()} == {recorded}, found
    assert len({d["cdc-derived"] for d in found.values()}) == 1, found


@pytest.mark.shared
def test_the_authors_uqdm_imports_to_the_recorded_digest_on_every_kernel():
    if not (UQDM_TINY_SOURCE / "checkpoint.pt").is_file():
        pytest.skip(f"needs the authors' checkpoint in {UQDM_TINY_SOURCE}: {HOW_TO_PROVIDE}")
    recorded = json.loads(CALIBRATION.read_text())["digest"]
    found = {name: digests_elsewhere(env, UQDM_TINY_SOURCE)["uqdm-tiny"] for name, env in KERNELS.items()}
    assert set(found.values()) == {recorded}, found


def test_uqdm_decodes_alike_whatever_tiles_are_batched_together(streams):
    """The same image framed in segments of 2 tiles and of 1 tile: the network ran on batches of
    2 and 1, and every prefix decodes to the same pixels."""
    folder, expected = streams
    assert (folder / "uqdm-b2.bin").read_bytes() != (folder / "uqdm-b1.bin").read_bytes()
    for name, pixels in expected["uqdm-b2.bin"].items():
        np.testing.assert_array_equal(expected["uqdm-b1.bin"][name], pixels, err_msg=name)


def test_cdc_decodes_alike_alone_or_in_a_batch(streams, cdc):
    folder, _ = streams
    datas = [(folder / name).read_bytes() for name in ("cdc-q1.bin", "cdc-q7.bin")] * 2
    together = cdc.decompress_batch(datas, steps=2)
    for data, pixels in zip(datas, together):
        np.testing.assert_array_equal(cdc.decompress(data, steps=2), pixels)


def test_the_tests_would_see_a_difference(streams):
    """The comparison is not vacuous: another image's decodes differ from these."""
    _, expected = streams
    with pytest.raises(AssertionError):
        assert_same_decodes(expected, {**expected, "uqdm-b2.bin": expected["uqdm-b1.bin"] | {
            "chunks1": expected["uqdm-b1.bin"]["chunks1"] ^ 1}})


@pytest.mark.parametrize("codec", sorted(ARCHIVE_CODECS))
def test_archive_written_here_reads_back_on_other_kernels(codec, tmp_path, local_ray):  # noqa: F811
    """compress_bucket writes an archive here; a process on scalar kernels decodes every record."""
    data = build_dataset(tmp_path / "shards", n_good=3, faults=False)
    out = tmp_path / "archive"
    run_compress(CompressConfig(str(data.folder), str(out), codec, actors=1, batch_size=2))
    archive = Archive(str(out))
    here = {key: {ARCHIVE_CODECS[codec]: archive.decode(key)} for key in archive.keys()}
    assert len(here) == 3
    env = {**KERNELS["scalar-sse41"], "OMP_NUM_THREADS": "2"}
    found = decode_elsewhere(out, env, tmp_path / "found.npz", archive=True)
    assert_same_decodes(here, {k: {ARCHIVE_CODECS[codec]: v["pixels"]} for k, v in found.items()})
