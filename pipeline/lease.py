"""One compress job at a time per output: a lease file, `_RUNNING`, at the archive's root.

Why: two jobs on one output both encode its pending shards and both commit them, their
blob and manifest writes interleaving: one job's manifest over the other's blob (offsets and
CRCs of other bytes where encodes differ, e.g. a float codec on a GPU and on a CPU) commits a
shard whose records fail their CRC, and every rerun skips it as committed. Their `_job.json`
updates can also lose each other's inputs, and one job's `_SUCCESS` then claims an archive
the other is still writing.

The driver creates the lease before any other write (locally exclusively: a second job
creating it at the same moment is refused), so it is also the probe that the output is
writable at all. It records host, pid, boot and PID namespace, start and a heartbeat,
refreshed every HEARTBEAT_SECONDS by a thread, and is removed when the run ends, failed or
not. A job that finds a lease is refused (OutputUnavailable, naming the holder), unless the
lease is stale: its heartbeat older than STALE_AFTER_SECONDS, or its pid gone in this same
boot and PID namespace (a driver killed with SIGKILL leaves its lease behind); a stale lease
is taken over with a warning. A lease this version cannot read is refused, not replaced. A
run whose heartbeat finds its lease taken over sets `lost` and commits no further shard.

Object stores have no create-if-absent, so two jobs starting at the same moment can both
write a lease: each reads its own back, and the one that finds the other's gives up. What
remains of that race is narrowed at commit, not closed: stages.commit_shard writes a
manifest only if the blob it points at still has the size and version that commit wrote.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from .storage import Location

log = logging.getLogger(__name__)
LEASE_FILE = "_RUNNING"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # 20 missed heartbeats: the holder is gone, not slow


class OutputUnavailable(RuntimeError):
    """The output cannot be written by this job: another job holds it, or it is not writable."""


@dataclass(frozen=True)
class Holder:
    """The job a lease belongs to; times are ISO 8601 UTC, readable in the file itself."""

    token: str  # this run's, so that a job never refreshes or removes another's lease
    host: str
    pid: int
    started: str
    heartbeat: str
    # boot and PID namespace: containers may share a host name but not their process numbers
    process_space: str = ""

    def describe(self) -> str:
        return (f"the compress job on {self.host} (pid {self.pid}, started {self.started}, last heartbeat "
                f"{_age(self.heartbeat):.0f} s ago)")

    def stale_because(self) -> str | None:
        """Why the holder is gone, or None if it may still be running."""
        if _age(self.heartbeat) > STALE_AFTER_SECONDS:
            return f"its heartbeat is over {STALE_AFTER_SECONDS / 60:.0f} minutes old"
        if (self.host, self.process_space) == (platform.node(), _process_space()) and not _process_exists(self.pid):
            return f"its process {self.pid} no longer runs on this host"
        return None


class OutputLease:
    """The output's lease, taken (OutputLease.take) and then held inside a `with` block: its
    heartbeat runs there, and it is removed when the block ends, however it ends."""

    def __init__(self, output: Location, mine: Holder):
        self.output, self.mine = output, mine
        self.stop = threading.Event()
        self.lost = threading.Event()  # set when another job took the lease over: commit nothing more
        self.heartbeat = threading.Thread(target=_beat, args=(output, mine, self.stop, self.lost),
                                          name="diffpress-lease", daemon=True)

    @classmethod
    def take(cls, output: Location, shown_as: str) -> OutputLease:
        """Take the output's lease (`shown_as`: its URL without credentials), before anything
        else is written; OutputUnavailable if another job holds it or it cannot be written."""
        return cls(output, _take(output, shown_as))

    def __enter__(self) -> OutputLease:
        self.heartbeat.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.heartbeat.join()
        _release(self.output, self.mine)


def _take(output: Location, shown_as: str) -> Holder:
    previous = _read(output)
    if previous is not None:
        stale = previous.stale_because()
        if stale is None:
            raise OutputUnavailable(
                f"{shown_as} is in use by {previous.describe()}: wait for it to finish, or write to another "
                f"--output. If that job is gone, its lease ({LEASE_FILE}) is taken over once its heartbeat is "
                f"{STALE_AFTER_SECONDS / 60:.0f} minutes old (at once on its own host), or delete {LEASE_FILE} "
                "yourself")
        log.warning("taking over the lease on %s from %s: %s", shown_as, previous.describe(), stale)
    now = _now()
    mine = Holder(uuid.uuid4().hex, platform.node(), os.getpid(), now, now, _process_space())
    try:
        if previous is not None:
            output.remove(LEASE_FILE)
        _create(output, mine)
    except FileExistsError:
        found = _read(output)
        raise OutputUnavailable(f"{shown_as} was taken at the same moment by "
                                f"{found.describe() if found else 'another job'}: write to another --output") from None
    except OSError as exc:  # read-only, full, no permission: every shard would fail the same way
        raise OutputUnavailable(f"cannot write to {shown_as} ({type(exc).__name__}: {exc}); give a writable "
                                "--output") from exc
    found = _read(output)
    if found != mine:  # another job wrote its lease between our look and our write
        raise OutputUnavailable(f"{shown_as} was taken at the same moment by "
                                f"{found.describe() if found else 'another job'}: write to another --output")
    return mine


def _beat(output: Location, mine: Holder, stop: threading.Event, lost: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            found = _read(output)
            if found is None or found.token != mine.token:
                log.error("the lease on the output was taken over by %s: this run commits nothing more",
                          found.describe() if found else "nobody (it was deleted)")
                lost.set()
                return
            _write(output, replace(mine, heartbeat=_now()))
        except Exception:  # noqa: BLE001 - a full disk or a network blip: the run goes on, try again
            log.warning("refreshing the output's lease failed; retrying in %.0f s", HEARTBEAT_SECONDS,
                        exc_info=True)


def _release(output: Location, mine: Holder) -> None:
    """Remove the lease if it is still ours. Never raises: it runs while a failure propagates."""
    try:
        found = _read(output)
        if found is not None and found.token == mine.token:
            output.remove(LEASE_FILE)
        else:
            log.warning("the output's lease is no longer this job's (%s): left in place",
                        found.describe() if found else "deleted")
    except Exception:  # noqa: BLE001 - the next run takes a dead job's lease over
        log.warning("removing the output's lease failed; the next run takes it over (its process is gone)",
                    exc_info=True)


def _read(output: Location) -> Holder | None:
    try:
        return Holder(**json.loads(output.read(LEASE_FILE)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:  # write_atomic leaves no halves: another program's, or newer
        raise OutputUnavailable(f"the output holds a {LEASE_FILE} this version cannot read ({exc}): if no "
                                f"compress job is running there, delete {LEASE_FILE}") from exc


def _write(output: Location, holder: Holder) -> None:
    output.write_atomic(LEASE_FILE, _encoded(holder))


def _create(output: Location, holder: Holder) -> None:
    """Write the lease where none is; FileExistsError if one appeared meanwhile. Locally that is
    exact (a whole temporary file hard-linked into place, which fails if the name exists).
    Object stores have no create-if-absent: an atomic write, then _take's read-back."""
    if not isinstance(output.fs, LocalFileSystem):
        _write(output, holder)
        return
    target = output.path(LEASE_FILE)
    os.makedirs(output.root, exist_ok=True)
    temporary = f"{target}.{holder.token}"
    with open(temporary, "wb") as file:
        file.write(_encoded(holder))
    try:
        os.link(temporary, target)
    finally:
        os.unlink(temporary)


def _encoded(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), indent=1).encode()


def _process_space() -> str:
    """This machine boot's id and this process's PID namespace (Linux; empty elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return f"{file.read().strip()}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age(moment: str) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(moment)).total_seconds()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
