"""``rlhfspec worker ROLE``: what every worker pod (and every local-mode process) runs.

Where it sits: the operator's pods run ``rlhfspec worker <coordinator|generation|inference|
trainer>`` with the job contract in their environment (``runtime.WorkerEnv``); local mode
starts the same command as processes. This parses the job once, runs preflight (a bad model
path or dataset row fails here, naming the field, before any engine starts), waits for Redis
(with backoff), then hands over to the role's loop. Exit codes: 0 done, 1 bad input or a
failed run, 2 a broken environment contract (refused Redis credentials included), 3 Redis
unreachable for longer than the retry limit (``redis_retry``; the restarted pod rejoins), 143
stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from rlhfspec_api.manifest import DocumentError, ManifestError
from rlhfspec_workers.faults import FaultSpecError, arm_from_environ
from rlhfspec_workers.observability.metrics import WorkerMetrics
from rlhfspec_workers.preflight import PreflightError, preflight
from rlhfspec_workers.redis_retry import (
    RedisUnreachableError,
    RetryLimitError,
    retry_seconds_from_environ,
)
from rlhfspec_workers.runtime import ROLES, Bus, RedisCredentialsError, WorkerEnv, WorkerEnvError

LOOPS = {
    "coordinator": "rlhfspec_workers.coordinator.loop",
    "generation": "rlhfspec_workers.generation.worker",
    "inference": "rlhfspec_workers.inference.worker",
    "trainer": "rlhfspec_workers.trainer.worker",
}


class Stopped(Exception):
    """SIGTERM: the pod is being deleted (suspend, scale down) or local mode is stopping."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Stopped


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["fetch"]:
        # Not a role: the init container that downloads remote models before the workers.
        from rlhfspec_workers.fetch.cli import main as fetch_main

        return fetch_main(given[1:])
    parser = argparse.ArgumentParser(prog="rlhfspec worker", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=ROLES)
    args = parser.parse_args(argv)
    try:
        env = WorkerEnv.from_environ(args.role)
        retry_seconds = retry_seconds_from_environ()
    except (WorkerEnvError, RetryLimitError) as exc:
        print(f"rlhfspec worker {args.role}: {exc}", file=sys.stderr)
        return 2
    try:
        # Test-only fault injection (faults.py); a variable naming no hook is refused here.
        fault = arm_from_environ(env.role, env.worker, env.storage)
    except FaultSpecError as exc:
        print(f"rlhfspec worker {args.role}: {exc}", file=sys.stderr)
        return 2
    if fault is not None:
        print(f"[rlhfspec] {env.worker}: fault armed: {fault}", flush=True)
    try:
        job = env.load_job()
    except DocumentError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ManifestError as exc:
        for error in exc.errors:
            print(f"{env.job_config}: {error}", file=sys.stderr)
        return 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        paths = preflight(job.spec, storage_root=env.storage, cluster=not env.local)
    except PreflightError as exc:
        for error in exc.errors:
            print(f"{env.job_config}: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    metrics = WorkerMetrics(env.job, env.role, env.worker)
    port = metrics.serve(env.metrics_port)
    bus = Bus(env, metrics=metrics, retry_seconds=retry_seconds)
    loop = importlib.import_module(LOOPS[args.role])
    print(
        f"[rlhfspec] {env.worker} of {env.namespace}/{env.job} starting (metrics on :{port})",
        flush=True,
    )
    try:
        bus.wait_ready()
        return int(loop.run(job, paths, bus))
    except RedisCredentialsError as exc:
        # The last line of the log: the pod's termination message, which the operator shows.
        print(f"rlhfspec worker {args.role}: {exc}", file=sys.stderr, flush=True)
        return 2
    except RedisUnreachableError as exc:
        print(f"rlhfspec worker {args.role}: {exc}", file=sys.stderr, flush=True)
        return 3
    except (Stopped, KeyboardInterrupt):
        print(f"[rlhfspec] {env.worker}: stopped", file=sys.stderr, flush=True)
        return 143
    finally:
        metrics.close()
