"""Fixtures for the pipeline tests: synthetic shards with faults, a private Ray, a real S3 server.

Everything started here is stopped here, by PID: other people run Ray and servers on
this machine too.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from pipeline.shards import Sample, write_shard

from .sample_images import photo_like

RCLONE = Path(sys.executable).with_name("rclone")
S3_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
SIZES = [(24, 40), (40, 24), (32, 32), (48, 56), (64, 64), (36, 52)]


def encoded(img: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def tar_of(entries: list[tuple[str, bytes | tarfile.TarInfo]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """A tar of (name, bytes) regular files and ready-made TarInfo entries (links, FIFOs, folders,
    devices, hostile headers: written without data)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content in entries:
            if isinstance(content, tarfile.TarInfo):
                tar.addfile(content)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def special_member(name: str, kind: bytes, target: str = "") -> tuple[str, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return name, info


def good_sample(key: str, seed: int, size: tuple[int, int] | None = None) -> Sample:
    height, width = size or SIZES[seed % len(SIZES)]
    fmt, ext = ("JPEG", "jpg") if seed % 2 else ("PNG", "png")
    return Sample(key, {ext: encoded(photo_like(height, width, seed), fmt),
                        "cls": str(seed).encode(), "json": f'{{"seed": {seed}}}'.encode()})


def one_shard(folder: Path, name: str, keys: list[str], size=(32, 32)) -> str:
    """folder/name.tar of good samples under these keys; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tar"
    path.write_bytes(write_shard([good_sample(key, i, size=size) for i, key in enumerate(keys)]))
    return str(path)


def bomb_png() -> bytes:
    """A valid PNG whose header claims 20000x20000 pixels."""
    data = bytearray(encoded(np.zeros((1, 1, 3), np.uint8), "PNG"))
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


SECRETS = ["AccountKey=s3cr3t1", "s3cr3t2", "s3cr3t3", "Bearer s3cr3t4", "s3cr3t5", "s3cr3t6", "s3cr3t7"]


def secret_options() -> dict:
    """Credentials under names no fixed list knew, inside a URL, in lists, nested."""
    return {"connection_string": f"DefaultEndpointsProtocol=https;AccountName=acct;{SECRETS[0]}",
            "passphrase": SECRETS[1], "endpoint_url": f"https://user:{SECRETS[2]}@store.example:9000",
            "headers": [["Authorization", SECRETS[3]]], "client_kwargs": {"sas_token": SECRETS[4], "region_name": "r1"},
            "key": SECRETS[5], "secret": SECRETS[6], "anon": False, "config_kwargs": {"retries": {"max_attempts": 3}}}


# Faulty samples and the reason category each must be recorded with.
FAULTS = {
    "corrupt": ({"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}, "cannot decode image"),
    "empty": ({"jpg": b""}, "empty file (zero bytes)"),
    "notes": ({"txt": b"not an image"}, "no image member"),
    "bomb": ({"png": bomb_png()}, "decompression bomb"),
}


@dataclass
class Dataset:
    folder: Path
    good: dict[str, Sample]   # key -> sample that must be encoded
    faults: dict[str, str]    # key ('' for shard-level) -> reason category


def build_dataset(folder: Path, n_good: int = 6, faults: bool = True) -> Dataset:
    """Shards: shard-000 (good + faults), shard-001 (good), shard-002 (truncated tar)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [good_sample(f"img{i:03d}", i) for i in range(n_good)]
    half = n_good // 2
    first = good[:half] + ([Sample(k, m) for k, (m, _) in FAULTS.items()] if faults else [])
    (folder / "shard-000.tar").write_bytes(write_shard(first))
    (folder / "shard-001.tar").write_bytes(write_shard(good[half:]))
    expected_faults = {k: reason for k, (_, reason) in FAULTS.items()} if faults else {}
    if faults:
        whole = [good_sample(f"trunc{i}", 100 + i) for i in range(3)]
        data = write_shard(whole)
        (folder / "shard-002.tar").write_bytes(data[:middle_of_member(data, "trunc2.")])
        good += whole[:2]
        expected_faults["trunc2"] = "truncated tar"
    return Dataset(folder, {s.key: s for s in good}, expected_faults)


def middle_of_member(tar_bytes: bytes, prefix: str) -> int:
    """Offset halfway through the first member whose name starts with `prefix`."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        info = next(i for i in tar if i.name.startswith(prefix))
    return info.offset_data + info.size // 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds} s")


def pids_mentioning(text: str) -> list[int]:
    """PIDs of this user's processes whose command line contains `text` (a private temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop_pids(pids: list[int], grace: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


def private_temp_dir() -> str:
    """A short temp dir (Ray's socket paths must stay under 108 characters)."""
    return tempfile.mkdtemp(prefix="dpray", dir="/tmp")


@pytest.fixture(scope="module")
def local_ray(weights_dir):
    """Our own in-process Ray on 2 CPUs, started after DIFFPRESS_WEIGHTS is set; yields its temp dir."""
    os.environ.update(S3_ENV)
    temp_dir = private_temp_dir()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield Path(temp_dir)
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    root: Path  # the folder rclone serves: one subfolder per bucket

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """`rclone serve s3` on a free private port with random keys; bucket 'bucket'."""
    root = tmp_path_factory.mktemp("s3root")
    (root / "bucket").mkdir()
    key, secret, port = "K" + secrets.token_hex(8), "S" + secrets.token_hex(16), free_port()
    process = subprocess.Popen(
        [str(RCLONE), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key", f"{key},{secret}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        os.environ.update(S3_ENV)
        yield S3Server(f"http://127.0.0.1:{port}", key, secret, root)
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """`mount OPTIONS TARGET` for the block (a tiny tmpfs, a read-only bind mount: real faults of
    the filesystem, which root's permissions do not bypass); skips where mounting is not
    allowed (not root, a container without CAP_SYS_ADMIN)."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"needs to mount a filesystem (root, CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield target
    finally:  # lazily: a Ray worker may still hold a file open there
        subprocess.run(["umount", "--lazy", str(target)], check=True)
