"""The fault-injection harness: a real local job, one role SIGKILLed at a named hook, restarted.

Where it sits: the fault tests (``tests/faults/test_*.py``) call :func:`run_job`. It starts a
tiny job exactly as ``rlhfspec run`` does (``local.run.LocalRun``: a real redis-server, real
worker processes, real vLLM on the tiny models), with ``RLHFSPEC_FAULT`` in the workers'
environment (``rlhfspec_workers.faults``). The restart logic is the chaos soak's
(``rlhfspec_workers.benchmarks.chaos.run_restarting``): when a worker dies of SIGKILL it is
restarted the way a kubelet restarts a pod's container: the same command, the same
environment (fault variable included: the fault's marker on the job's storage keeps it from
firing again), the same storage, its log appended to. Any other non-zero exit fails the run,
unless the test names it in ``restart_codes`` (the Redis partition test restarts workers that
exit 3, Redis unreachable past the retry limit, as Kubernetes restarts any failed pod).

Jobs are tiny and greedy (temperature 0, speculation off, one generation replica), so a
fault-free run and a recovered run must agree sample by sample: the tests compare the
trainer's own record of what it trained on (``trainer.trained_record``).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.benchmarks.chaos import (
    PROMPTS,
    REDIS_UNREACHABLE,
    SAMPLES,
    SIGKILLED,
    Chaos,
    JobRun,
    expected_sample_ids,
    run_restarting,
    tiny_greedy_job,
)

ITERATIONS = 3
JOB_TIMEOUT_SECONDS = 420.0
FaultRun = JobRun

__all__ = [
    "ITERATIONS",
    "PROMPTS",
    "REDIS_UNREACHABLE",
    "SAMPLES",
    "FaultRun",
    "expected_sample_ids",
    "fault_job",
    "run_job",
]


def fault_job(name: str = "faults") -> RLHFJob:
    """Three iterations of 4 prompts x 2 greedy samples on the tiny kit."""
    return tiny_greedy_job(name, ITERATIONS)


def run_job(
    job: RLHFJob,
    run_dir: Path,
    fault: str | None,
    restart_delay: float = 0.0,
    *,
    chaos: Chaos | None = None,
    restart_codes: Collection[int] = (SIGKILLED,),
) -> FaultRun:
    """Run ``job`` to the end with ``fault`` (``RLHFSPEC_FAULT``'s value, None for a fault-free
    run), calling ``chaos`` every poll; restart SIGKILLed workers and those exiting with a code
    in ``restart_codes`` (after ``restart_delay`` s); fail on any other crash or after
    JOB_TIMEOUT_SECONDS."""
    return run_restarting(
        job,
        run_dir,
        fault=fault,
        timeout=JOB_TIMEOUT_SECONDS,
        restart_delay=restart_delay,
        chaos=chaos,
        restart_codes=restart_codes,
    )
