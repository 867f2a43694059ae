"""Pure: every object the operator creates for a new RLHFJob, in creation order.

Where it sits: the one list of children shared by the create handler (``handlers.start``
creates these objects one by one, posting a ``Created`` or ``CreateFailed`` event for each)
and by ``rlhfspec render`` (prints them as YAML without a cluster). Keeping the list here,
not in the handler, is what makes ``render`` show exactly what the operator creates: a new
child added to a job is added here once and both see it.

The order matters on a cluster: the job's config, its KV key and the managed Redis (Secret,
Deployment, Service, NetworkPolicy) come before any pod that reads them; worker pods come last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_operator import builders, network_policy
from rlhfspec_operator.naming import Owner


def creation_plan(
    job: RLHFJob,
    owner: Owner,
    *,
    password: str,
    operator_namespace: str | None,
    metrics_from: Sequence[dict[str, Any]],
    with_pods: bool,
    kv_key: str | None = None,
) -> list[dict[str, Any]]:
    """The manifests the operator creates for ``job``, owned by ``owner``.

    ``password`` is the managed Redis password (ignored for an external Redis);
    ``operator_namespace`` and ``metrics_from`` are the operator's own settings the
    NetworkPolicies admit; ``with_pods`` adds the worker pods (a fresh, unsuspended job: after
    an operator restart, or on resume, the reconcile timer creates the missing pods instead);
    without ``kv_key`` a new KV key is drawn (see ``builders.children``)."""
    objects = builders.children(
        job, owner, password=password, operator_namespace=operator_namespace, kv_key=kv_key
    )
    objects.append(network_policy.worker_network_policy(job, owner, metrics_from))
    if with_pods:
        objects += builders.worker_pods(job, owner)
    return objects
