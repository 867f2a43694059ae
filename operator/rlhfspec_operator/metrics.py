"""Prometheus metrics of the operator: per-job gauges from the status, operator counters.

Where it sits: the reconcile timer calls :meth:`Registry.observe` with each job's new status
and counts pod actions; ``rlhfspec operator --metrics-port`` serves :meth:`Registry.render`
(text exposition format 0.0.4) from a small aiohttp server the handlers start. The numbers are
the ones in ``kubectl get rlhfjobs``, so dashboards and the CLI never disagree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from rlhfspec_api.status import Phase, RLHFJobStatus

# Gauge name -> help; the values come from ``_values``.
_JOB_GAUGES = {
    "rlhfspec_job_iteration": "Iterations completed.",
    "rlhfspec_job_total_iterations": "Iterations requested.",
    "rlhfspec_job_restarts": "Worker pods recreated after failures.",
    "rlhfspec_job_tokens_per_second": "Generated tokens per second (all replicas).",
    "rlhfspec_job_mean_accepted_length": "Tokens emitted per sequence per verification step.",
    "rlhfspec_job_migrations": "Samples migrated between generation replicas.",
    "rlhfspec_job_reward_mean": "Mean reward of the last iteration.",
    "rlhfspec_job_kl": "Mean KL to the reference of the last iteration.",
    "rlhfspec_job_eval_accuracy": "Held-out accuracy of the latest evaluated policy.",
}
_COUNTERS = {
    "rlhfspec_operator_reconciles_total": "Reconcile ticks run.",
    "rlhfspec_operator_pods_created_total": "Worker pods created.",
    "rlhfspec_operator_pods_deleted_total": "Worker pods deleted (failed, suspended, scaled).",
}


def _values(status: RLHFJobStatus) -> dict[str, float | None]:
    gen = status.generation
    return {
        "rlhfspec_job_iteration": status.iteration,
        "rlhfspec_job_total_iterations": status.total_iterations,
        "rlhfspec_job_restarts": status.restarts,
        "rlhfspec_job_tokens_per_second": gen.tokens_per_second if gen else None,
        "rlhfspec_job_mean_accepted_length": gen.mean_accepted_length if gen else None,
        "rlhfspec_job_migrations": gen.migrations if gen else None,
        "rlhfspec_job_reward_mean": status.reward_mean,
        "rlhfspec_job_kl": status.kl,
        "rlhfspec_job_eval_accuracy": status.eval_accuracy,
    }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Registry:
    jobs: dict[tuple[str, str], RLHFJobStatus] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def observe(self, namespace: str, job: str, status: RLHFJobStatus) -> None:
        self.jobs[(namespace, job)] = status

    def forget(self, namespace: str, job: str) -> None:
        self.jobs.pop((namespace, job), None)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def render(self) -> str:
        lines = [
            "# HELP rlhfspec_job_phase The job's phase (1 for the current one).",
            "# TYPE rlhfspec_job_phase gauge",
        ]
        for (namespace, job), status in sorted(self.jobs.items()):
            for phase in Phase:
                current = 1 if status.phase is phase else 0
                labels = f'namespace="{_escape(namespace)}",job="{_escape(job)}"'
                lines.append(f'rlhfspec_job_phase{{{labels},phase="{phase.value}"}} {current}')
        for name, help_text in _JOB_GAUGES.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for (namespace, job), status in sorted(self.jobs.items()):
                value = _values(status)[name]
                if value is not None:
                    labels = f'namespace="{_escape(namespace)}",job="{_escape(job)}"'
                    lines.append(f"{name}{{{labels}}} {float(value):g}")
        for name, help_text in _COUNTERS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines.append(f"{name} {self.counters[name]}")
        return "\n".join(lines) + "\n"


REGISTRY = Registry()


async def serve(registry: Registry, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Start ``GET /metrics`` on ``host:port``; the caller cleans the runner up."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=registry.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
