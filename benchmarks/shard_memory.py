"""Peak memory of compressing one big shard: the driver's and the decode worker's (and, in a
full run, the encoders' and the commit's), for shards of several sizes.

    python -m benchmarks.shard_memory                       # reading stage, 64 MB and 1 GB shards
    python -m benchmarks.shard_memory --stage full --sizes-mb 8 32 --codec cdc-hp128

A shard of small images (64x64 PNGs of noise, ~12 KB each: 1 GB is ~86,000 images) is
written to a temporary folder, then run through a private in-process Ray (2 CPUs):
- `read`: the pipeline's own decode task (pipeline.compress.decode_shard: the tar streamed
  from storage, every image decoded to pixels, batched), consumed by a driver that drops
  each batch as it arrives, as the scheduler does once a batch is encoded. No codec runs:
  encoding 1 GB of images takes hours on this machine's CPUs.
- `full`: run_compress with a real codec, end to end (decode, encode, commit).
Peak RSS is each process's high-water mark (VmHWM in /proc; Ray's workers are told apart by
the titles Ray gives them while they run a task, `ray::decode_shard`, `ray::Encoder`, ...).
Memory that grows with the shard shows as a peak that grows with the size; bounded memory
as the same peak at every size. Writes benchmarks/results/shard_memory.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results" / "shard_memory.json"
ROLES = ("decode_shard", "Encoder", "commit")  # task and actor names, as in Ray's process titles
RESULT_LINE = "RESULT "


def write_big_shard(path: Path, size_mb: float, side: int, distinct: int = 256) -> int:
    """A tar of `size_mb` MB of side x side noise PNGs, streamed to disk; returns the image count."""
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(distinct):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="PNG")
        pngs.append(out.getvalue())
    count, target = 0, size_mb * 1e6
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        while tar.offset < target:
            for name, data in ((f"{count:08d}.png", pngs[count % distinct]), (f"{count:08d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


class PeakSampler:
    """Watches this machine's Ray worker processes; their peak RSS by role at the end."""

    def __init__(self):
        self.roles: dict[int, set[str]] = {}
        self.peaks: dict[int, int] = {}
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        mine = os.getpid()
        while self.running:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    if not title.startswith("ray::") or not _descends_from(int(entry.name), mine):
                        continue
                    role = next((r for r in ROLES if r in title), None)
                    if role:
                        self.roles.setdefault(int(entry.name), set()).add(role)
                        self.peaks[int(entry.name)] = _status_kib(entry, "VmHWM")
                except (OSError, ValueError):
                    continue
            time.sleep(0.2)

    def stop(self) -> dict[str, dict]:
        self.running = False
        self.thread.join()
        for pid in self.peaks:  # the last word, while the workers still live
            try:
                self.peaks[pid] = max(self.peaks[pid], _status_kib(Path(f"/proc/{pid}"), "VmHWM"))
            except OSError:
                pass
        return {role: {"processes": sum(role in r for r in self.roles.values()),
                       "peak_rss_mib": round(max((self.peaks[p] for p, r in self.roles.items() if role in r),
                                                 default=0) / 1024, 1)}
                for role in ROLES}


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _status_kib(proc: Path, field: str) -> int:
    for line in (proc / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in {proc}/status")


def read_stage(shard_path: Path, batch_size: int) -> dict:
    from pipeline.compress import decode_shard
    from pipeline.storage import Shard

    task = decode_shard.options(num_cpus=0, _generator_backpressure_num_objects=6)
    started, images, batches = time.perf_counter(), 0, 0
    for ref in task.remote(Shard("big", f"file://{shard_path}"), {}, batch_size):
        item = ray.get(ref)  # only counted here; the scheduler passes refs on without fetching
        images += len(getattr(item, "images", []))
        batches += 1
        del item, ref
    return {"images": images, "batches": batches, "seconds": time.perf_counter() - started}


def full_stage(shard_path: Path, out: Path, codec: str, batch_size: int) -> dict:
    from pipeline.compress import CompressConfig, run_compress

    started = time.perf_counter()
    summary = run_compress(CompressConfig(str(shard_path), str(out), codec, actors=2, batch_size=batch_size))
    assert summary.complete, summary.uncommitted
    return {"images": summary.images, "errors": summary.errors_by_reason, "seconds": time.perf_counter() - started,
            "compressed_bytes": summary.compressed_bytes}


def measure(stage: str, size_mb: float, side: int, codec: str, batch_size: int, folder: Path) -> dict:
    shard = folder / f"big-{size_mb:g}.tar"
    count = write_big_shard(shard, size_mb, side)
    driver_before = _status_kib(Path("/proc/self"), "VmRSS")
    temp_dir = tempfile.mkdtemp(prefix="dpmem", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        sampler = PeakSampler()
        run = (read_stage(shard, batch_size) if stage == "read"
               else full_stage(shard, folder / f"out-{size_mb:g}", codec, batch_size))
        workers = sampler.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    result = {"stage": stage, "shard_mb": round(shard.stat().st_size / 1e6, 1), "images_in_shard": count,
              "batch_size": batch_size, "side": side, **run,
              "driver_rss_before_mib": round(driver_before / 1024, 1),
              "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "workers": workers}
    shard.unlink()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("read", "full"), default="read")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 1024])
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--codec", default="cdc-hp128", help="for --stage full (default cdc-hp128)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--folder", help="where the shard is written (default: a temporary folder)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args(argv)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="dpshard"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(RESULT_LINE + json.dumps(measure(args.stage, args.sizes_mb[0], args.side, args.codec, args.batch_size,
                                               folder)))
        return
    runs = []
    try:
        for size in args.sizes_mb:  # each in a process of its own: the driver's peak is the process's
            command = [sys.executable, "-m", "benchmarks.shard_memory", "--one", "--stage", args.stage,
                       "--sizes-mb", str(size), "--side", str(args.side), "--codec", args.codec,
                       "--batch-size", str(args.batch_size), "--folder", str(folder)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.split(RESULT_LINE, 1)[1]))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    report = {"runs": runs, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "load_average": os.getloadavg()}}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.stage] = report
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\n{'shard MB':>9} {'images':>7} {'batch':>5} {'seconds':>8} {'driver MiB':>11} "
          + " ".join(f"{role + ' MiB':>17}" for role in ROLES))
    for run in sorted(runs, key=lambda r: r["shard_mb"]):
        print(f"{run['shard_mb']:>9.1f} {run['images']:>7} {run['batch_size']:>5} {run['seconds']:>8.1f} "
              f"{run['driver_peak_rss_mib']:>11.1f} "
              + " ".join(f"{run['workers'][role]['peak_rss_mib']:>17.1f}" for role in ROLES))
    print(f"(peak RSS, whole processes; written to {RESULTS})")


if __name__ == "__main__":
    main()
