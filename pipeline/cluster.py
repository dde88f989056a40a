"""Joining Ray and sizing actor pools: what every job that runs on a cluster shares.

    connect_ray()                          # RAY_ADDRESS (ray job submit), else Ray in-process
    count, gpus = actor_pool(actors, gpus_per_actor, "decoders")
    ray.remote(...).options(runtime_env=runtime_env())
    failure(exc)                           # one line about a failed Ray call: its cause, not Ray's wrapper

ConfigError is a run that cannot start as asked (flags, resources, an archive it would
corrupt, an output in use): the command lines print it as one line and exit 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ray

# Driver environment every task needs: where `load_codec` finds weights, and botocore's
# checksum mode (S3-compatible servers such as rclone's need "when_required"). Never
# credentials: those travel only in storage options.
PASSED_ENV = ("DIFFPRESS_WEIGHTS", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")


class ConfigError(ValueError):
    """The run cannot start as asked (flags, resources, an archive it would corrupt, an output in use)."""


def runtime_env() -> dict | None:
    """The driver's environment that every worker needs too (encoders, decoders, readers): where
    load_codec finds weights, botocore's checksum mode. Never credentials."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    return {"env_vars": env} if env else None


def actor_pool(actors: int | None, gpus_per_actor: float | None, what: str) -> tuple[int, float]:
    """(how many actors, GPUs each) for a pool of `what` (encoders, decoders): by default one per
    GPU when the cluster has GPUs, else one per CPU. A pool the cluster cannot hold is refused:
    its actors would wait for resources forever, and the work sent to them."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    per_actor = gpus_per_actor if gpus_per_actor is not None else (1 if gpus else 0)
    count = actors or max(1, int(gpus // per_actor if per_actor else cpus))
    if count * per_actor > gpus:
        raise ConfigError(f"{count} {what} of {per_actor:g} GPU each need {count * per_actor:g} GPUs; the cluster "
                          f"has {gpus:g}: lower --actors or --gpus-per-actor (0 runs them on CPUs)")
    if count > cpus:
        raise ConfigError(f"{count} {what} need a CPU each; the cluster has {cpus:g}: lower --actors")
    return count, per_actor


def connect_ray(env: Mapping[str, str] = os.environ) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start Ray in-process.

    address="local" rather than ray.init()'s default: that would join any Ray already
    running on this machine (another user's), not start our own.
    """
    if not ray.is_initialized():
        ray.init(address=env.get("RAY_ADDRESS") or "local", log_to_driver=True)


def failure(exc: ray.exceptions.RayError) -> str:
    """One line about a failed Ray call, without its traceback (the caller says which call).
    Not the task's function_name: Ray raises most task errors as a class that derives from the
    cause's too (an OSError from a commit is also an OSError), and that has no function_name;
    and not the wrapper's first line, which names the actor and its pid, never why."""
    cause = exc
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        cause = exc.cause
    lines = str(cause).splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
