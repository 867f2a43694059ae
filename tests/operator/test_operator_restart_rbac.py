"""Operator restarts create no duplicates; the operator's requests match its least-privilege RBAC.

The restart test runs its own cluster and a namespaced operator (``--namespace``) so it can
SIGKILL it mid-flight. The RBAC test drives a job through every code path that calls the API
and checks each request the operator made against ``rlhfspec_operator.rbac.RULES``: nothing
used is missing, nothing granted is unused.
"""

from __future__ import annotations

import json
import re

from cluster import UNREACHABLE_REDIS, Cluster, example_job

from rlhfspec_operator import rbac

JOB = "tiny-grpo"


def test_operator_restart_during_initializing_creates_no_duplicates(own_cluster: Cluster) -> None:
    cluster, namespace = own_cluster, "restart"
    flags = ("--namespace", namespace)
    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)
    cluster.apply(example_job(JOB, namespace))
    # Kill it as soon as it has started creating children: mid-handler, before status.
    cluster.wait_for(lambda: cluster.peek("v1/configmaps", namespace), "the first child", 60)
    cluster.stop_operator(kill=True)
    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)

    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    cluster.wait_for_phase(JOB, namespace, "Initializing")
    for pod in cluster.pod_names(namespace, JOB):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")  # the new operator is in charge

    creations = cluster.emulator.call(lambda emulator: dict(emulator.creations))
    children = {k: n for k, n in creations.items() if k[1] == namespace and k[2] != JOB}
    children = {k: n for k, n in children.items() if "/events" not in k[0]}
    assert len(children) == 16, sorted(children)  # 12 children + 4 pods
    duplicates = {k: n for k, n in children.items() if n != 1}
    assert duplicates == {}


def _verb(method: str, path: str, watch: str) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of a request; None for discovery."""
    match = re.fullmatch(
        r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?"
        r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?",
        path,
    )
    if match is None or (match["resource"] == "namespaces" and match["name"] is None):
        return None
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    if method == "GET":
        verb = "watch" if watch else ("get" if match["name"] else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    return (match["group"] or "", resource, verb)


def test_the_operator_uses_exactly_the_verbs_its_rbac_grants(
    cluster: Cluster, namespace: str
) -> None:
    # A path through every API call: create all children (managed Redis, a claim), read the
    # password back, scale (ConfigMap patch), fail a pod (delete), status patches, events.
    cluster.apply(example_job(JOB, namespace, backoffLimit=2))
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    body = json.dumps({"spec": {"generation": {"replicas": 2}}})
    cluster.kubectl("patch", "rlhfjob", JOB, "-n", namespace, "--type=merge", "-p", body)
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 5, "5 worker pods")
    cluster.set_pod_status(namespace, f"{JOB}-inference", "Failed")
    cluster.wait_for(lambda: cluster.status(JOB, namespace).get("restarts") == 1, "a restart")
    # ttlSecondsAfterFinished + ttlDeletesJob: every child, then the job, deleted by name.
    expiring = "expiring"
    cluster.apply(example_job(expiring, namespace, ttlSecondsAfterFinished=0, ttlDeletesJob=True))
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, expiring)) == 4, "its 4 pods")
    cluster.set_pod_status(namespace, f"{expiring}-coordinator", "Succeeded")
    cluster.wait_for(
        lambda: expiring not in cluster.peek("rlhfspec.io/v1alpha1/rlhfjobs", namespace),
        "the finished job deleted by its TTL",
    )

    log = cluster.emulator.call(lambda emulator: list(emulator.request_log))
    operator_agents = ("kopf/", "rlhfspec-operator")
    used = {
        verb
        for method, path, watch, agent in log
        if agent.startswith(operator_agents) and (verb := _verb(method, path, watch)) is not None
    }
    granted = {
        (group, resource, verb)
        for rule in rbac.RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used - granted == set(), "the operator needs more than its RBAC grants"
    assert granted - used == set(), "the RBAC grants verbs the operator never uses"
