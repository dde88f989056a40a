"""compress_bucket's orchestration on Ray core: shards -> decode tasks -> encoder actors -> commits.

Why Ray core rather than Ray Data: outputs are written per shard (one blob + one manifest),
so every image of a shard must meet again after encoding. Here the driver tracks, per
shard, which batches are out and commits the shard the moment its last batch is back, with
bounded prefetch; only small objects (counts) pass through the driver.

    decode_shard  (task, generator)  reads one tar, yields ShardInfo then DecodedBatches
    Encoder       (actor, 1 GPU if the cluster has GPUs, else 1 CPU) holds one codec
    commit        (task)             writes data/, errors/, then manifest/ for a shard
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import ray
from tqdm import tqdm

from model import load_codec

from . import stages
from .manifest import JOB_FILE, SUCCESS_FILE, manifest_path, read_errors, read_manifests
from .storage import Location, Shard, list_shards, open_location, redact

log = logging.getLogger(__name__)

ARCHIVE_FORMAT = "diffpress-archive/1"
# Driver environment every task needs: where `load_codec` finds weights, and botocore's
# checksum mode (S3-compatible servers such as rclone's need "when_required"). Never
# credentials: those travel only in storage options.
PASSED_ENV = ("DIFFPRESS_WEIGHTS", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
ENCODES_PER_ACTOR = 2  # one running, one queued, so an actor never waits for the driver


@dataclass
class CompressConfig:
    inputs: str | list[str]
    output: str
    codec: str
    actors: int | None = None             # default: one per GPU (per gpus_per_actor), else one per CPU
    gpus_per_actor: float | None = None   # default: 1 when the cluster has GPUs, else 0
    batch_size: int = 4
    storage_options: dict = field(default_factory=dict)

    def public(self) -> dict:
        """The config as it may be logged or stored: credentials redacted."""
        return {**asdict(self), "storage_options": redact(self.storage_options)}


@dataclass
class RunSummary:
    """Totals over the whole archive (every committed shard), plus this run's speed."""

    output: str
    shards: int
    shards_skipped: int
    images: int
    pixels: int
    source_bytes: int
    compressed_bytes: int
    bpp: float
    errors_by_reason: dict[str, int]
    run_images: int
    run_seconds: float
    megapixels_per_second: float
    steady_megapixels_per_second: float
    encoders: dict[str, dict]

    def table(self) -> str:
        # No steady rate when there were too few batches for every encoder to be warm.
        steady = (f" ({self.steady_megapixels_per_second:.4f} after start-up)"
                  if self.steady_megapixels_per_second else "")
        lines = [f"archive            {self.output}",
                 f"shards             {self.shards} ({self.shards_skipped} already committed, skipped)",
                 f"images             {self.images}",
                 f"source bytes       {self.source_bytes}",
                 f"compressed bytes   {self.compressed_bytes}",
                 f"bpp                {self.bpp:.4f}",
                 f"this run           {self.run_images} images in {self.run_seconds:.1f} s, "
                 f"{self.megapixels_per_second:.4f} MP/s{steady}",
                 f"errors             {sum(self.errors_by_reason.values())}"]
        lines += [f"  {reason:<28} {count}" for reason, count in sorted(self.errors_by_reason.items())]
        return "\n".join(lines)


class Encoder:
    """Holds one codec; on a GPU when Ray gave it one and torch sees it, else on CPU."""

    def __init__(self, codec_name: str, index: int):
        # The codec picks its device from torch.cuda.is_available(): Ray's GPU ids alone
        # would put a codec on a GPU that torch cannot see (e.g. a cluster's fake GPUs).
        self.codec = load_codec(codec_name)
        self.identity = {"actor": index, "node": ray.get_runtime_context().get_node_id(),
                         "device": str(self.codec.device)}

    def describe(self) -> stages.CodecInfo:
        return stages.CodecInfo(self.codec.name, self.codec.weights_digest.hex(), self.codec.progressive)

    @ray.method(num_returns=2)
    def encode(self, batch: stages.DecodedBatch) -> tuple[stages.EncodedBatch, dict]:
        started, cpu = time.perf_counter(), time.process_time()
        encoded = stages.encode_batch(self.codec, batch)
        stats = {"images": len(encoded.images), "pixels": sum(i.width * i.height for i in encoded.images),
                 "busy_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                 **self.identity}
        return encoded, stats


@ray.remote
def decode_shard(shard: Shard, storage_options: dict, batch_size: int):
    data = open_location(shard.url, storage_options).read()
    yield from stages.decode_shard_batches(shard, data, batch_size)


@ray.remote(num_cpus=0)  # I/O-bound
def commit(output: str, storage_options: dict, info: stages.ShardInfo, codec: stages.CodecInfo,
           *batches: stages.EncodedBatch) -> stages.ShardTotals:
    return stages.commit_shard(open_location(output, storage_options), info, batches, codec)


@dataclass
class _ShardProgress:
    shard: Shard
    info: ray.ObjectRef | None = None
    n_batches: int = 0
    # Decoded batches not yet encoded, by batch number; dropped once encoded, so a shard's
    # pixels do not stay in the object store until the whole shard is done.
    decoded: dict[int, ray.ObjectRef] = field(default_factory=dict)
    encoded: dict[int, ray.ObjectRef] = field(default_factory=dict)
    decoded_all: bool = False
    committing: bool = False

    @property
    def ready_to_commit(self) -> bool:
        return self.decoded_all and not self.decoded and not self.committing


def run_compress(config: CompressConfig) -> RunSummary:
    """Compress every uncommitted shard of `config.inputs` into the archive at `config.output`.

    Needs a connected Ray (ray.init). Safe to rerun: committed shards are skipped.
    """
    log.info("compress_bucket config: %s", json.dumps(config.public()))
    shards = list_shards(config.inputs, config.storage_options)
    output = open_location(config.output, config.storage_options)
    pending = [s for s in shards if not output.exists(manifest_path(s.name))]
    log.info("%d shards, %d already committed", len(shards), len(shards) - len(pending))
    encoders, use_gpus = _start_encoders(config)
    try:
        scheduler = _Scheduler(config, encoders, use_gpus)
        scheduler.prefetch(pending)  # shards decode while the encoders load their codecs
        codec = ray.get(encoders[0].describe.remote())
        _write_job_file(output, config, codec, shards)  # before any commit: it refuses mixed archives
        if pending:
            output.remove(SUCCESS_FILE)
        scheduler.run(codec)
    finally:  # free the CPUs/GPUs now, even when the run fails, not when handles are collected
        for actor in encoders:
            ray.kill(actor)
    summary = _summarize(output, config.output, shards, len(shards) - len(pending), scheduler)
    output.write_atomic(SUCCESS_FILE, json.dumps(asdict(summary), indent=1).encode())
    return summary


def _runtime_env() -> dict | None:
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    return {"env_vars": env} if env else None


def _start_encoders(config: CompressConfig) -> tuple[list, bool]:
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1 if gpus else 0)
    if per_actor:
        count = config.actors or max(1, int(gpus // per_actor))
    else:
        count = config.actors or max(1, int(resources.get("CPU", 1)))
    remote = ray.remote(Encoder).options(num_cpus=1, num_gpus=per_actor, max_restarts=-1, max_task_retries=3,
                                         runtime_env=_runtime_env())
    log.info("starting %d encoder actors (%s GPU each)", count, per_actor)
    return [remote.remote(config.codec, i) for i in range(count)], bool(per_actor)


class _Scheduler:
    """The driver loop: keeps every encoder busy, bounded prefetch, commits finished shards."""

    def __init__(self, config: CompressConfig, encoders: list, use_gpus: bool):
        self.config, self.encoders = config, encoders
        self.codec: stages.CodecInfo | None = None
        # Decoding is a small fraction of encoding. With GPUs it reserves a CPU of its own;
        # without, the encoders hold every CPU, so decode tasks reserve none (the driver
        # bounds how many run) and spread over the nodes.
        self.decode = decode_shard.options(num_cpus=1 if use_gpus else 0, scheduling_strategy="SPREAD",
                                           _generator_backpressure_num_objects=2 * len(encoders) + 2,
                                           runtime_env=_runtime_env())
        self.commit = commit.options(runtime_env=_runtime_env())
        self.max_decoding = len(encoders) + 1
        self.todo: deque[Shard] = deque()
        self.decoding: dict = {}          # generator -> _ShardProgress
        self.queue: deque = deque()       # (progress, batch number) awaiting an encoder
        self.encoding: dict = {}          # stats ref -> (progress, batch number, actor number)
        self.committing: dict = {}        # commit ref -> _ShardProgress
        self.load = [0] * len(encoders)
        self.stats: dict[str, dict] = {}  # per encoder actor: images, pixels, nodes, devices
        self.started = self.finished_at = self.seconds = 0.0
        # Steady state: from when every encoder has returned a batch, i.e. without start-up
        # (actors loading codecs, workers starting), which a long job pays once.
        self.warm_actors: set[int] = set()
        self.steady_since: float | None = None
        self.steady_pixels = 0

    def prefetch(self, shards: list[Shard]) -> None:
        self.started = time.monotonic()
        self.todo.extend(shards)
        self._start_decodes()

    def run(self, codec: stages.CodecInfo) -> None:
        """Encode and commit every prefetched shard; commits record `codec`."""
        self.codec = codec
        with tqdm(total=len(self.todo) + len(self.decoding), unit="shard", desc="compress",
                  mininterval=1.0) as self.bar:
            while self.todo or self.decoding or self.queue or self.encoding or self.committing:
                self._start_decodes()
                self._dispatch()
                self._wait()
        self.finished_at = time.monotonic()
        self.seconds = self.finished_at - self.started

    @property
    def steady_megapixels_per_second(self) -> float:
        elapsed = self.finished_at - self.steady_since if self.steady_since else 0.0
        return self.steady_pixels / 1e6 / elapsed if elapsed else 0.0

    def _start_decodes(self) -> None:
        while self.todo and len(self.decoding) < self.max_decoding:
            shard = self.todo.popleft()
            generator = self.decode.remote(shard, self.config.storage_options, self.config.batch_size)
            self.decoding[generator] = _ShardProgress(shard)

    def _dispatch(self) -> None:
        while self.queue and min(self.load) < ENCODES_PER_ACTOR:
            progress, number = self.queue.popleft()
            actor = self.load.index(min(self.load))
            encoded, stats = self.encoders[actor].encode.remote(progress.decoded[number])
            progress.encoded[number] = encoded
            self.encoding[stats] = (progress, number, actor)
            self.load[actor] += 1

    def _wait(self) -> None:
        # Stop pulling decoded batches while the encoders are saturated (backpressure).
        generators = list(self.decoding) if len(self.queue) < len(self.encoders) * ENCODES_PER_ACTOR else []
        waitable = generators + list(self.encoding) + list(self.committing)
        if not waitable:
            return
        ready, _ = ray.wait(waitable, num_returns=1)
        for item in ready:
            if item in self.decoding:
                self._on_decoded(item)
            elif item in self.encoding:
                self._on_encoded(item)
            else:
                self._on_committed(item)

    def _on_decoded(self, generator) -> None:
        progress = self.decoding[generator]
        try:
            ref = next(generator)
        except StopIteration:
            del self.decoding[generator]
            progress.decoded_all = True
            self._commit_if_ready(progress)
            return
        if progress.info is None:
            progress.info = ref
        else:
            number = progress.n_batches
            progress.n_batches += 1
            progress.decoded[number] = ref
            self.queue.append((progress, number))

    def _on_encoded(self, stats_ref) -> None:
        progress, number, actor = self.encoding.pop(stats_ref)
        self.load[actor] -= 1
        decoded = progress.decoded.pop(number)
        try:
            stats = ray.get(stats_ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # The encoder died on this batch on every retry: record it, keep going.
            log.error("batch %d of shard %s failed: %s", number, progress.shard.name, exc)
            progress.encoded[number] = ray.put(stages.failed_batch(
                ray.get(decoded), "encoder crashed", f"{type(exc).__name__} after retries"))
        else:
            entry = self.stats.setdefault(str(stats["actor"]), {"images": 0, "pixels": 0, "busy_seconds": 0.0,
                                                                "cpu_seconds": 0.0, "nodes": [], "devices": []})
            if self.steady_since is not None:
                self.steady_pixels += stats["pixels"]
            self.warm_actors.add(actor)
            if self.steady_since is None and len(self.warm_actors) == len(self.encoders):
                self.steady_since = time.monotonic()
            entry["images"] += stats["images"]
            entry["pixels"] += stats["pixels"]
            entry["busy_seconds"] += stats["busy_seconds"]
            entry["cpu_seconds"] += stats["cpu_seconds"]
            _add_unique(entry["nodes"], stats["node"])
            _add_unique(entry["devices"], stats["device"])
            self.bar.set_postfix(images=sum(e["images"] for e in self.stats.values()), refresh=False)
        self._commit_if_ready(progress)

    def _commit_if_ready(self, progress: _ShardProgress) -> None:
        if progress.ready_to_commit:
            progress.committing = True
            encoded = [progress.encoded[n] for n in sorted(progress.encoded)]
            ref = self.commit.remote(self.config.output, self.config.storage_options, progress.info, self.codec, *encoded)
            self.committing[ref] = progress

    def _on_committed(self, ref) -> None:
        progress = self.committing.pop(ref)
        totals = ray.get(ref)  # a failed write fails the job; the rerun redoes this shard
        log.info("committed shard %s: %d images, %d errors", progress.shard.name, totals.images,
                 sum(totals.errors.values()))
        self.bar.update(1)


def _add_unique(values: list, value) -> None:
    if value not in values:
        values.append(value)


def _write_job_file(output: Location, config: CompressConfig, codec: stages.CodecInfo, shards: list[Shard]) -> None:
    """Record what made the archive; refuse to mix codecs or weights in one archive."""
    inputs = [s.url for s in shards]
    if output.exists(JOB_FILE):
        previous = json.loads(output.read(JOB_FILE))
        if (previous["codec"], previous["weights_digest"]) != (codec.name, codec.weights_digest):
            raise ValueError(
                f"{config.output} already holds an archive made with {previous['codec']} (weights "
                f"{previous['weights_digest']}); this run uses {codec.name} ({codec.weights_digest}). "
                "Write to a new --output.")
        inputs = sorted(set(previous["inputs"]) | set(inputs))
    job = {"format": ARCHIVE_FORMAT, "codec": codec.name, "weights_digest": codec.weights_digest,
           "progressive": codec.progressive, "config": config.public(), "versions": _versions(),
           "inputs": inputs}
    output.write_atomic(JOB_FILE, json.dumps(job, indent=1).encode())


def _versions() -> dict[str, str]:
    import pyarrow
    import torch

    from importlib.metadata import version
    return {"diffpress": version("diffpress"), "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def _summarize(output: Location, url: str, shards: list[Shard], skipped: int, run: _Scheduler) -> RunSummary:
    manifests, errors = read_manifests(output), read_errors(output)
    pixels = sum(w * h for w, h in zip(manifests["width"].to_pylist(), manifests["height"].to_pylist()))
    compressed = sum(manifests["length"].to_pylist())
    run_pixels = sum(e["pixels"] for e in run.stats.values())
    return RunSummary(
        output=url, shards=len(shards), shards_skipped=skipped, images=manifests.num_rows, pixels=pixels,
        source_bytes=sum(manifests["source_bytes"].to_pylist()), compressed_bytes=compressed,
        bpp=8 * compressed / pixels if pixels else 0.0,
        errors_by_reason=dict(Counter(errors["category"].to_pylist())),
        run_images=sum(e["images"] for e in run.stats.values()), run_seconds=run.seconds,
        megapixels_per_second=run_pixels / 1e6 / run.seconds if run.seconds else 0.0,
        steady_megapixels_per_second=run.steady_megapixels_per_second, encoders=run.stats)


def connect_ray(env: Mapping[str, str] = os.environ) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start Ray in-process.

    address="local" rather than ray.init()'s default: that would join any Ray already
    running on this machine (another user's), not start our own.
    """
    if not ray.is_initialized():
        ray.init(address=env.get("RAY_ADDRESS") or "local", log_to_driver=True)
