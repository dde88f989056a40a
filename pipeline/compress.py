"""compress_bucket's orchestration on Ray core: shards -> decode tasks -> encoder actors -> commits.

Why Ray core rather than Ray Data: outputs are written per shard (one blob + one manifest),
so every image of a shard must meet again after encoding. Here the driver tracks, per
shard, which batches are out and commits the shard the moment its last batch is back, with
bounded prefetch; only small objects (object refs, counts, reasons) pass through the driver.

    decode_shard  (task, generator)  streams one tar, yields DecodedBatches
    Encoder       (actor, 1 GPU if the cluster has GPUs, else 1 CPU) holds one codec
    commit        (task)             streams data/, then errors/, then manifest/ for a shard

Nothing lost: a shard is committed only when every image was encoded or has a final error
(the input's fault). A transient failure (an encoder that died on every retry, storage, a
codec error) leaves the shard uncommitted: the summary says which and why, _SUCCESS is not
written, and a rerun of the same command does it again. A committed shard is skipped only
if its manifest records the same source URL: another shard under the same name is refused.

One job per output: the driver holds the output's lease (`_RUNNING`, pipeline.lease) from
before its first write to its end, failed or not; a second job is refused (ConfigError,
naming the first) unless the lease is stale (no heartbeat for 10 minutes, or its process gone
on this host, as after SIGKILL), which it takes over with a warning; a run whose lease is
taken over commits no further shard. Taking the lease is also the probe that the output is
writable (read-only, or too full for even the lease: refused before Ray starts; a disk that
fills later leaves shards uncommitted with the OSError). An input
shard that is not the file listed, before or after it is read (replaced, truncated), is left
uncommitted ("changed since listing"), and a rerun reads it as it is then.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
from tqdm import tqdm

from model import load_codec
from model.metrics import psnr_from_mse

from . import stages
from .cluster import ConfigError, actor_pool, connect_ray, failure, runtime_env
from .lease import OutputLease, OutputUnavailable
from .manifest import JOB_FILE, SUCCESS_FILE, CommittedShard, ShardTotals, read_committed
from .storage import Location, Shard, list_shards, open_location, redact, redact_url, shard_name

log = logging.getLogger(__name__)

ARCHIVE_FORMAT = "diffpress-archive/1"
ENCODES_PER_ACTOR = 2  # one running, one queued, so an actor never waits for the driver
ENCODER_RETRIES = 3    # an encode call is retried this often on an encoder that died
COMMIT_FETCH = 8       # encoded batches a commit holds at once
REASONS_KEPT = 5       # per uncommitted shard, in the summary
QUALITY_SAMPLE = 2     # images per encoder decoded again (the readers' default) for the summary's PSNR


@dataclass
class CompressConfig:
    inputs: str | list[str]
    output: str
    codec: str
    actors: int | None = None             # default: one per GPU (per gpus_per_actor), else one per CPU
    gpus_per_actor: float | None = None   # default: 1 when the cluster has GPUs, else 0
    batch_size: int = 4
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if not self.inputs:
            problems.append("inputs (--input): give at least one shard, folder or glob")
        if not self.output:
            problems.append("output (--output): give the archive's URL")
        if self.actors is not None and (isinstance(self.actors, bool) or not isinstance(self.actors, int)
                                        or self.actors < 1):
            problems.append(f"actors (--actors) must be a whole number >= 1 (or unset: one per GPU, else one per "
                            f"CPU), got {self.actors!r}")
        if self.gpus_per_actor is not None and not (isinstance(self.gpus_per_actor, (int, float))
                                                    and 0 <= self.gpus_per_actor < float("inf")):
            problems.append(f"gpus_per_actor (--gpus-per-actor) must be a number >= 0 (0: encode on CPUs), got "
                            f"{self.gpus_per_actor!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size (--batch-size) must be a whole number >= 1, got {self.batch_size!r}")
        if not isinstance(self.storage_options, Mapping):
            problems.append(f"storage_options (--storage-options) must be a JSON object (name: value), got "
                            f"{type(self.storage_options).__name__}")
        if problems:
            raise ConfigError("; ".join(problems))

    def public(self) -> dict:
        """The config as it may be logged or stored: credentials redacted, in options and URLs."""
        inputs = ([redact_url(i) for i in self.inputs] if isinstance(self.inputs, (list, tuple))
                  else ",".join(redact_url(i) for i in self.inputs.split(",")))
        return {**asdict(self), "inputs": inputs, "output": redact_url(self.output),
                "storage_options": redact(self.storage_options)}


@dataclass
class RunSummary:
    """This run's inputs and the archive: totals over every committed shard, this run's speed,
    and the shards left uncommitted by transient failures (the archive is then incomplete)."""

    output: str
    shards: int                 # this run's input shards
    shards_skipped: int         # of those, committed before this run
    shards_committed: int       # of those, committed by this run
    uncommitted: dict[str, list[str]]  # shard -> why it is not committed (a rerun tries again)
    complete: bool              # every input the archive ever had is committed: _SUCCESS written
    archive_shards: int         # committed shards in the archive (also from earlier inputs)
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
    codec: str = ""                       # name (with its rate point) and weights digest
    progressive: bool = False
    sample_psnr: float | None = None      # dB, default decode of QUALITY_SAMPLE images per encoder
    sample_images: int = 0

    def table(self) -> str:
        # No steady rate when there were too few batches for every encoder to be warm.
        steady = (f" ({self.steady_megapixels_per_second:.4f} after start-up)"
                  if self.steady_megapixels_per_second else "")
        lines = [f"archive            {self.output}",
                 f"codec              {self.codec}",
                 f"shards             {self.shards} ({self.shards_skipped} already committed, skipped), "
                 f"{self.shards_committed} committed now, {len(self.uncommitted)} not committed",
                 f"images             {self.images}",
                 f"source bytes       {self.source_bytes}",
                 f"compressed bytes   {self.compressed_bytes}",
                 f"bpp                {self.bpp:.4f} (all compressed bytes over all pixels; the manifests' bpp "
                 "column is each image's own)",
                 f"this run           {self.run_images} images in {self.run_seconds:.1f} s, "
                 f"{self.megapixels_per_second:.4f} MP/s{steady}",
                 f"quality            {self.quality()}",
                 f"errors             {sum(self.errors_by_reason.values())}"]
        lines += [f"  {reason:<28} {count}" for reason, count in sorted(self.errors_by_reason.items())]
        if self.uncommitted:
            lines.append(f"NOT COMMITTED      {len(self.uncommitted)} shards, after transient failures (no "
                         f"{SUCCESS_FILE}); rerun the same command to retry them:")
            lines += [f"  {name:<28} {'; '.join(reasons)}" for name, reasons in sorted(self.uncommitted.items())]
        elif not self.complete:
            lines.append(f"INCOMPLETE         earlier inputs of this archive are not committed (no {SUCCESS_FILE}); "
                         "rerun with them to finish it")
        if self.compressed_bytes > self.source_bytes:
            lines.append(f"WARNING            the archive is larger than its source ({self.compressed_bytes} > "
                         f"{self.source_bytes} bytes): choose a lower rate point (diffpress info lists them) or "
                         "keep the source files")
        if self.images:
            lines.append(f"next               diffpress decode --input {self.output} --to DECODED   "
                         "(or pipeline.archive.Archive / pipeline.loader.ArchiveDataset in Python)")
        return "\n".join(lines)

    def quality(self) -> str:
        if self.sample_images:
            return f"PSNR {self.sample_psnr:.2f} dB, default decode of {self.sample_images} images of this run"
        if self.progressive:
            return "lossless with every chunk (progressive codec); not sampled: decoding costs as much as encoding"
        return "not sampled (no image encoded in this run)"


class Encoder:
    """Holds one codec; on a GPU when Ray gave it one and torch sees it, else on CPU."""

    def __init__(self, codec_name: str, index: int):
        # The codec picks its device from torch.cuda.is_available(): Ray's GPU ids alone
        # would put a codec on a GPU that torch cannot see (e.g. a cluster's fake GPUs).
        self.codec = load_codec(codec_name)
        self.identity = {"actor": index, "node": ray.get_runtime_context().get_node_id(),
                         "device": str(self.codec.device)}
        self.sampled = 0  # images decoded again for the summary's quality figure

    def describe(self) -> stages.CodecInfo:
        return stages.CodecInfo(self.codec.name, self.codec.weights_digest.hex(), self.codec.progressive)

    @ray.method(num_returns=2)
    def encode(self, batch: stages.DecodedBatch) -> tuple[stages.EncodedBatch, dict]:
        started, cpu = time.perf_counter(), time.process_time()
        encoded = stages.encode_batch(self.codec, batch)
        stats = {"images": len(encoded.images), "pixels": sum(i.width * i.height for i in encoded.images),
                 "busy_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                 "transient": stages.transient_reasons(encoded), **self.identity}
        if self.sampled < QUALITY_SAMPLE and not self.codec.progressive and encoded.images:
            stats["quality"] = self._squared_error(batch, encoded)
        return encoded, stats

    def _squared_error(self, batch: stages.DecodedBatch, encoded: stages.EncodedBatch) -> tuple[float, int, int]:
        """(sum of squared errors, values, images) of the readers' default decode of a few of this
        batch's streams against their pixels; zeros if that decode fails (it is only the summary's figure)."""
        sample = encoded.images[:QUALITY_SAMPLE - self.sampled]
        self.sampled += len(sample)
        pixels = {image.source.index: image.pixels for image in batch.images}
        try:
            decoded = self.codec.decompress_batch([image.data for image in sample])
        except Exception:  # noqa: BLE001 - a failed sample must not fail the batch
            log.warning("decoding the quality sample failed", exc_info=True)
            return 0.0, 0, 0
        errors = [float(((d.astype(np.float64) - pixels[e.source.index]) ** 2).sum()) for e, d in zip(sample, decoded)]
        return sum(errors), sum(d.size for d in decoded), len(decoded)


@ray.remote
def decode_shard(shard: Shard, storage_options: dict, batch_size: int):
    yield from stages.read_shard_batches(shard, storage_options, batch_size)


@ray.remote(num_cpus=0)  # I/O-bound
def commit(output: str, storage_options: dict, shard: Shard, codec: stages.CodecInfo,
           batches: list[ray.ObjectRef]) -> ShardTotals:
    """Commit a shard; its encoded batches are fetched a few at a time (refs in a list are
    not resolved by Ray before the call), so the commit holds a few batches, not the shard."""
    def fetched():
        for start in range(0, len(batches), COMMIT_FETCH):
            yield from ray.get(batches[start:start + COMMIT_FETCH])
    return stages.commit_shard(open_location(output, storage_options), shard, fetched(), codec)


@dataclass
class _ShardProgress:
    shard: Shard
    n_batches: int = 0
    # Decoded batches not yet encoded, by batch number; dropped once encoded, so a shard's
    # pixels do not stay in the object store until the whole shard is done.
    decoded: dict[int, ray.ObjectRef] = field(default_factory=dict)
    encoded: dict[int, ray.ObjectRef] = field(default_factory=dict)
    decoded_all: bool = False
    finished: bool = False      # committing, or given up
    failures: list[str] = field(default_factory=list)  # transient: the shard will not be committed

    @property
    def ready(self) -> bool:
        return self.decoded_all and not self.decoded and not self.finished


def run_compress(config: CompressConfig) -> RunSummary:
    """Compress every uncommitted shard of `config.inputs` into the archive at `config.output`.

    Joins Ray (connect_ray) only once the inputs are listed and the archive is checked: inputs
    that do not exist, an output that another job is writing or that cannot be written, or an
    archive this run would corrupt, are a ConfigError before any work. The run holds the
    output's lease (pipeline.lease) from then on. Safe to rerun: committed shards are skipped,
    shards left uncommitted by transient failures are done again.
    """
    log.info("compress_bucket config: %s", json.dumps(config.public()))
    try:
        shards = list_shards(config.inputs, config.storage_options)
    except (FileNotFoundError, ValueError) as exc:  # no such input, two inputs of one name: the user's to fix
        raise ConfigError(str(exc)) from exc
    output = open_location(config.output, config.storage_options)
    try:
        lease = OutputLease.take(output, redact_url(config.output))
    except OutputUnavailable as exc:  # another job's, read-only, full: the user's to sort out
        raise ConfigError(str(exc)) from exc
    with lease:
        return _compress(config, shards, output, lease)


def _compress(config: CompressConfig, shards: list[Shard], output: Location, lease: OutputLease) -> RunSummary:
    """run_compress, once the inputs are listed and the output's lease is held."""
    committed = read_committed(output)  # one listing, one footer per manifest
    _refuse_other_sources(config, shards, committed)
    pending = [s for s in shards if s.name not in committed]
    log.info("%d shards, %d already committed", len(shards), len(shards) - len(pending))
    connect_ray()
    encoders, use_gpus = _start_encoders(config)
    try:
        scheduler = _Scheduler(config, encoders, use_gpus, lease.lost)
        scheduler.prefetch(pending)  # shards decode while the encoders load their codecs
        codec = ray.get(encoders[0].describe.remote())
        archive_inputs = _write_job_file(output, config, codec, shards)  # before any commit: refuses mixed archives
        if pending:
            output.remove(SUCCESS_FILE)
        scheduler.run(codec)
    finally:  # free the CPUs/GPUs now, even when the run fails, not when handles are collected
        for actor in encoders:
            ray.kill(actor)
    summary = _summarize(config, shards, committed, scheduler, archive_inputs)
    if summary.complete:
        output.write_atomic(SUCCESS_FILE, json.dumps(asdict(summary), indent=1).encode())
    else:
        output.remove(SUCCESS_FILE)
        log.error("%d shards not committed after transient failures; rerun the same command to retry them: %s",
                  len(summary.uncommitted), ", ".join(sorted(summary.uncommitted)))
    return summary


def _refuse_other_sources(config: CompressConfig, shards: list[Shard],
                          committed: dict[str, CommittedShard]) -> None:
    """A committed shard stands for its source only: another input under its name is refused,
    not skipped (its images would be lost) nor written over (the archive's would be)."""
    clashes = [(shard, committed[shard.name].source_url) for shard in shards if shard.name in committed
               and committed[shard.name].source_url is not None
               and redact_url(committed[shard.name].source_url) != shard.public_url]
    if clashes:
        lines = [f"  {shard.name}: committed from {source}, this run's input is {shard.public_url}"
                 for shard, source in clashes]
        raise ConfigError(f"{redact_url(config.output)} already holds shards of the same names from other sources "
                          "(outputs are named after the shard file's name):\n" + "\n".join(lines)
                          + "\nWrite to another --output, or rename these inputs.")


def _start_encoders(config: CompressConfig) -> tuple[list, bool]:
    count, per_actor = actor_pool(config.actors, config.gpus_per_actor, "encoders")
    remote = ray.remote(Encoder).options(num_cpus=1, num_gpus=per_actor, max_restarts=-1, max_task_retries=ENCODER_RETRIES,
                                         runtime_env=runtime_env())
    log.info("starting %d encoder actors (%s GPU each)", count, per_actor)
    return [remote.remote(config.codec, i) for i in range(count)], bool(per_actor)


class _Scheduler:
    """The driver loop: keeps every encoder busy, bounded prefetch, commits finished shards."""

    def __init__(self, config: CompressConfig, encoders: list, use_gpus: bool, lease_lost: threading.Event):
        self.config, self.encoders, self.lease_lost = config, encoders, lease_lost
        self.codec: stages.CodecInfo | None = None
        # Decoding is a small fraction of encoding. With GPUs it reserves a CPU of its own;
        # without, the encoders hold every CPU, so decode tasks reserve none (the driver
        # bounds how many run) and spread over the nodes.
        self.decode = decode_shard.options(num_cpus=1 if use_gpus else 0, scheduling_strategy="SPREAD",
                                           _generator_backpressure_num_objects=2 * len(encoders) + 2,
                                           runtime_env=runtime_env())
        self.commit = commit.options(runtime_env=runtime_env())
        self.max_decoding = len(encoders) + 1
        self.todo: deque[Shard] = deque()
        self.decoding: dict = {}          # generator -> _ShardProgress
        self.queue: deque = deque()       # (progress, batch number) awaiting an encoder
        self.encoding: dict = {}          # stats ref -> (progress, batch number, actor number)
        self.committing: dict = {}        # commit ref -> _ShardProgress
        self.committed: dict[str, ShardTotals] = {}  # by this run
        self.uncommitted: dict[str, list[str]] = {}  # shard -> transient failures (a rerun retries)
        self.load = [0] * len(encoders)
        self.stats: dict[str, dict] = {}  # per encoder actor: images, pixels, nodes, devices
        self.started = self.finished_at = self.seconds = 0.0
        # Steady state: from when every encoder has returned a batch, i.e. without start-up
        # (actors loading codecs, workers starting), which a long job pays once.
        self.warm_actors: set[int] = set()
        self.steady_since: float | None = None
        self.steady_pixels = 0
        self.squared_error, self.sampled_values, self.sampled_images = 0.0, 0, 0  # the quality sample

    def prefetch(self, shards: list[Shard]) -> None:
        self.started = time.monotonic()
        self.todo.extend(shards)
        self._start_decodes()

    def run(self, codec: stages.CodecInfo) -> None:
        """Encode and commit every prefetched shard; commits record `codec`."""
        self.codec = codec
        # In images (a shard's count is known only once it is read), the shards in the postfix
        self.shard_count = len(self.todo) + len(self.decoding)
        with tqdm(unit="image", desc="compress", mininterval=1.0) as self.bar:
            self._show_shards()
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
            if progress.failures:  # the shard will not be committed: encoding the rest is wasted
                del progress.decoded[number]
                self._finish_if_ready(progress)
                continue
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
            self._finish_if_ready(progress)
            return
        # A decode task that failed past Ray's retries yields its error here; the encode
        # call it is passed to fails with it, and the shard is left uncommitted.
        number = progress.n_batches
        progress.n_batches += 1
        progress.decoded[number] = ref
        self.queue.append((progress, number))

    def _on_encoded(self, stats_ref) -> None:
        progress, number, actor = self.encoding.pop(stats_ref)
        self.load[actor] -= 1
        del progress.decoded[number]
        try:
            stats = ray.get(stats_ref)
        except ray.exceptions.RayError as exc:
            # The encoder died on this batch on every retry (or the batch never decoded):
            # not the input's fault, so the shard is not committed and a rerun tries again.
            log.error("batch %d of shard %s failed: %s", number, progress.shard.name, exc)
            progress.failures.append(f"batch {number}: {_failure(exc)}")
            del progress.encoded[number]
        else:
            progress.failures += stats.pop("transient")
            self._count(actor, stats)
        self._finish_if_ready(progress)

    def _count(self, actor: int, stats: dict) -> None:
        entry = self.stats.setdefault(str(stats["actor"]), {"images": 0, "pixels": 0, "busy_seconds": 0.0,
                                                            "cpu_seconds": 0.0, "nodes": [], "devices": []})
        if self.steady_since is not None:
            self.steady_pixels += stats["pixels"]
        self.warm_actors.add(actor)
        if self.steady_since is None and len(self.warm_actors) == len(self.encoders):
            self.steady_since = time.monotonic()
        if "quality" in stats:
            squared_error, values, images = stats.pop("quality")
            self.squared_error += squared_error
            self.sampled_values += values
            self.sampled_images += images
        entry["images"] += stats["images"]
        entry["pixels"] += stats["pixels"]
        entry["busy_seconds"] += stats["busy_seconds"]
        entry["cpu_seconds"] += stats["cpu_seconds"]
        _add_unique(entry["nodes"], stats["node"])
        _add_unique(entry["devices"], stats["device"])
        self.bar.update(stats["images"])

    def _show_shards(self) -> None:
        done = len(self.committed) + len(self.uncommitted)
        self.bar.set_postfix_str(f"shards {done}/{self.shard_count}", refresh=False)

    def _finish_if_ready(self, progress: _ShardProgress) -> None:
        if not progress.ready:
            return
        progress.finished = True
        if progress.failures:
            self._give_up(progress, progress.failures)
            return
        if self.lease_lost.is_set():
            self._give_up(progress, ["another job took over the output's lease: not committed beside it"])
            return
        encoded = [progress.encoded[n] for n in sorted(progress.encoded)]
        progress.encoded.clear()
        ref = self.commit.remote(self.config.output, self.config.storage_options, progress.shard, self.codec, encoded)
        self.committing[ref] = progress

    def _give_up(self, progress: _ShardProgress, reasons: list[str]) -> None:
        kept = reasons[:REASONS_KEPT] + ([f"... {len(reasons) - REASONS_KEPT} more"]
                                         if len(reasons) > REASONS_KEPT else [])
        log.error("shard %s not committed (a rerun retries it): %s", progress.shard.name, "; ".join(kept))
        self.uncommitted[progress.shard.name] = kept
        progress.encoded.clear()
        self._show_shards()

    def _on_committed(self, ref) -> None:
        progress = self.committing.pop(ref)
        try:
            totals = ray.get(ref)
        except ray.exceptions.RayError as exc:  # storage failed: nothing committed, a rerun redoes it
            self._give_up(progress, [f"commit failed: {_failure(exc)}"])
            return
        self.committed[progress.shard.name] = totals
        log.info("committed shard %s: %d images, %d errors", progress.shard.name, totals.images,
                 sum(totals.errors.values()))
        self._show_shards()


def _failure(exc: ray.exceptions.RayError) -> str:
    """One line about a failed Ray call (cluster.failure), an encoder's crash said as such."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"encoder crashed ({type(exc).__name__}, after {ENCODER_RETRIES} retries)"
    return failure(exc)


def _add_unique(values: list, value) -> None:
    if value not in values:
        values.append(value)


def _write_job_file(output: Location, config: CompressConfig, codec: stages.CodecInfo,
                    shards: list[Shard]) -> list[str]:
    """Record what made the archive; refuse to mix codecs or weights in one archive.
    Returns every input the archive was ever given (URLs without credentials)."""
    inputs = [s.public_url for s in shards]
    if output.exists(JOB_FILE):
        previous = json.loads(output.read(JOB_FILE))
        if (previous["codec"], previous["weights_digest"]) != (codec.name, codec.weights_digest):
            raise ConfigError(
                f"{redact_url(config.output)} already holds an archive made with {previous['codec']} (weights "
                f"{previous['weights_digest']}); this run uses {codec.name} ({codec.weights_digest}). "
                "Write to a new --output.")
        inputs = sorted({redact_url(url) for url in previous["inputs"]} | set(inputs))
    job = {"format": ARCHIVE_FORMAT, "codec": codec.name, "weights_digest": codec.weights_digest,
           "progressive": codec.progressive, "config": config.public(), "versions": _versions(),
           "inputs": inputs}
    output.write_atomic(JOB_FILE, json.dumps(job, indent=1).encode())
    return inputs


def _versions() -> dict[str, str]:
    import pyarrow
    import torch

    from importlib.metadata import version
    return {"diffpress": version("diffpress"), "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def _summarize(config: CompressConfig, shards: list[Shard], before: dict[str, CommittedShard], run: _Scheduler,
               archive_inputs: list[str]) -> RunSummary:
    """From the totals the commits returned and the footers read at the start: no manifest is read."""
    totals = ShardTotals()
    for committed in [c.totals for c in before.values()] + list(run.committed.values()):
        totals += committed
    committed_names = set(before) | set(run.committed)
    run_pixels = sum(e["pixels"] for e in run.stats.values())
    return RunSummary(
        output=redact_url(config.output), shards=len(shards), shards_skipped=sum(s.name in before for s in shards),
        shards_committed=len(run.committed), uncommitted=dict(sorted(run.uncommitted.items())),
        complete=all(shard_name(url) in committed_names for url in archive_inputs),
        archive_shards=len(committed_names), images=totals.images, pixels=totals.pixels,
        source_bytes=totals.source_bytes, compressed_bytes=totals.compressed_bytes,
        bpp=8 * totals.compressed_bytes / totals.pixels if totals.pixels else 0.0,
        errors_by_reason=dict(totals.errors),
        run_images=sum(e["images"] for e in run.stats.values()), run_seconds=run.seconds,
        megapixels_per_second=run_pixels / 1e6 / run.seconds if run.seconds else 0.0,
        steady_megapixels_per_second=run.steady_megapixels_per_second, encoders=run.stats,
        codec=f"{run.codec.name} (weights {run.codec.weights_digest[:16]})", progressive=run.codec.progressive,
        sample_psnr=psnr_from_mse(run.squared_error / run.sampled_values) if run.sampled_values else None,
        sample_images=run.sampled_images)
