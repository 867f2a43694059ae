"""Status for humans (#19 item 6) and ``rlhfspec render`` against the real operator.

* ``kubectl get rlhfjobs -o wide`` adds GENERATION REPLICAS, READY and MIGRATIONS (fed from
  the coordinator's progress in Redis) to the default columns, which keep EVAL;
* ``kubectl describe rlhfjob`` lists one ``Created`` event per child, and ``CreateFailed``
  (Warning) naming the kind and name when the API server refuses one;
* ``kubectl scale rlhfjob X --replicas N`` creates and deletes generation pods until they
  match, and ``status.generationReplicas`` (the scale subresource's status) follows the running
  ones; replicas below 1 is refused naming the field; ``kubectl patch`` of
  ``spec.generation.replicas`` takes the same path;
* ``rlhfspec render`` prints exactly the children the operator creates.

KMock alone has no scale subresource (it merged ``kubectl scale``'s body into the job itself);
``emulator_scale`` serves it from the CRD's paths as the API server does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import kmock
import redis
import yaml
from cluster import (
    ROOT,
    Cluster,
    example_job,
    external_coordinator,
    redis_password_secret,
)

from rlhfspec_workers.messages import JobProgress, Keys

JOB = "tiny-grpo"
GENERATION_SELECTOR = f"rlhfspec.io/job={JOB},rlhfspec.io/role=generation"


def run_pods(cluster: Cluster, namespace: str, count: int) -> list[str]:
    """Wait for ``count`` worker pods and mark every one Running (the kubelet's part)."""
    cluster.wait_for(
        lambda: len(cluster.pod_names(namespace, JOB)) == count, f"{count} worker pods"
    )
    names = cluster.pod_names(namespace, JOB)
    for pod in names:
        cluster.set_pod_status(namespace, pod, "Running")
    return names


def external_job(cluster: Cluster, namespace: str, server: redis.Redis, **spec: Any) -> None:
    """The example job on the session's redis-server (the one Redis the operator reaches)."""
    port = server.connection_pool.connection_kwargs["port"]
    cluster.apply(redis_password_secret(namespace))
    coordinator = external_coordinator(f"redis://127.0.0.1:{port}/0")
    cluster.apply(example_job(JOB, namespace, coordinator=coordinator, **spec))


def table(cluster: Cluster, namespace: str, *flags: str) -> dict[str, str]:
    """`kubectl get rlhfjobs` as {COLUMN: value} for the one job."""
    out = cluster.kubectl("get", "rlhfjobs", "-n", namespace, *flags)
    header, row = out.splitlines()[:2]
    # Columns are separated by two or more spaces; headers may contain one ("GENERATION
    # REPLICAS"), values never do.
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 2 : i] == "  ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def scale(cluster: Cluster, namespace: str, replicas: int) -> None:
    """What a user types: the scale subresource writes spec.generation.replicas."""
    cluster.kubectl("scale", "rlhfjob", JOB, "-n", namespace, f"--replicas={replicas}")


def patch_replicas(cluster: Cluster, namespace: str, replicas: int) -> None:
    body = json.dumps({"spec": {"generation": {"replicas": replicas}}})
    cluster.kubectl("patch", "rlhfjob", JOB, "-n", namespace, "--type=merge", "-p", body)


def scale_subresource(cluster: Cluster, namespace: str) -> dict[str, Any]:
    path = f"/apis/rlhfspec.io/v1alpha1/namespaces/{namespace}/rlhfjobs/{JOB}/scale"
    return dict(json.loads(cluster.kubectl("get", "--raw", path)))


def generation_pods(cluster: Cluster, namespace: str) -> list[str]:
    return [p for p in cluster.pod_names(namespace, JOB) if "-generation-" in p]


def test_wide_columns_show_replicas_ready_and_migrations_from_redis(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    doc_generation = example_job(JOB, namespace)["spec"]["generation"]
    external_job(cluster, namespace, redis_server, generation={**doc_generation, "replicas": 2})
    run_pods(cluster, namespace, 5)
    cluster.wait_for_phase(JOB, namespace, "Running")
    progress = JobProgress(
        iteration=1,
        total_iterations=4,
        state="running",
        migrations=7,
        eval_accuracy=0.5,
        updated_at=time.time(),
    )
    redis_server.set(Keys(namespace, JOB).progress, progress.to_bytes())
    cluster.wait_for(
        lambda: (cluster.status(JOB, namespace).get("generation") or {}).get("migrations") == 7,
        "status.generation.migrations from Redis",
    )
    status = cluster.status(JOB, namespace)
    assert status["generationReplicas"] == 2
    assert status["selector"] == GENERATION_SELECTOR

    wide = table(cluster, namespace, "-o", "wide")
    assert wide["GENERATION REPLICAS"] == "2"
    assert wide["READY"] == "2"
    assert wide["MIGRATIONS"] == "7"
    assert wide["EVAL"] == "0.5"
    plain = table(cluster, namespace)
    assert "EVAL" in plain and "PHASE" in plain
    assert not {"GENERATION REPLICAS", "READY", "MIGRATIONS"} & set(plain)
    # categories stay off "all", as for RayJob: `kubectl get all` lists no RLHFJob.
    crd = yaml.safe_load((ROOT / "crds" / "rlhfjob.yaml").read_text())
    assert "all" not in crd["spec"]["names"]["categories"]


def test_describe_lists_an_event_per_created_and_failed_child(
    cluster: Cluster, namespace: str
) -> None:
    # The API server refuses the first create of the job's worker NetworkPolicy (once; the
    # emulator stores the object anyway, so the retry finds it and carries on).
    path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
    refused: list[bool] = []

    def refuse_once(request: kmock.Request) -> Any:
        if refused:
            return NotImplemented  # served by the emulator as usual
        refused.append(True)
        return kmock.Response(status=500, payload={"kind": "Status", "message": "etcd timeout"})

    workers_policy = kmock.data({"metadata": {"name": f"{JOB}-workers"}})
    cluster.emulator.call(lambda emulator: emulator["post"][path][workers_policy] << refuse_once)
    cluster.apply(example_job(JOB, namespace))

    def created() -> list[str]:
        return [
            e["message"]
            for e in cluster.events(namespace)
            if e["reason"] == "Created" and e["involvedObject"]["name"] == JOB
        ]

    # The handler retries after the failure; then the pods are created, last.
    messages = cluster.wait_for(
        lambda: (m := created()) and any("Pod tiny-grpo-trainer" in x for x in m) and m,
        "a Created event for the last child",
        timeout=60,
    )
    for child in (
        "ConfigMap tiny-grpo-config",
        "Secret tiny-grpo-kv",
        "Secret tiny-grpo-redis",
        "Deployment tiny-grpo-redis",
        "Service tiny-grpo-generation",
        "PersistentVolumeClaim tiny-grpo-storage",
        "Pod tiny-grpo-generation-0",
    ):
        assert f"Created {child}" in messages, child
    assert len(messages) == len(set(messages)), "one event per child"
    (failure,) = [e for e in cluster.events(namespace) if e["reason"] == "CreateFailed"]
    assert failure["type"] == "Warning"
    assert (
        "cannot create NetworkPolicy tiny-grpo-workers: HTTP 500: etcd timeout"
        in (failure["message"])
    )
    described = cluster.kubectl("describe", "rlhfjob", JOB, "-n", namespace)
    assert "CreateFailed" in described and "Created ConfigMap tiny-grpo-config" in described


def test_scaling_replicas_resizes_the_generation_pods_and_the_ready_count(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(example_job(JOB, namespace))
    run_pods(cluster, namespace, 4)
    cluster.wait_for_phase(JOB, namespace, "Running")
    assert cluster.status(JOB, namespace)["generationReplicas"] == 1

    scale(cluster, namespace, 4)
    expected = [f"{JOB}-generation-{i}" for i in range(4)]
    cluster.wait_for(lambda: generation_pods(cluster, namespace) == expected, "4 generation pods")
    # New pods count once they run.
    assert cluster.status(JOB, namespace)["generationReplicas"] == 1
    for pod in expected[1:]:
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for(
        lambda: cluster.status(JOB, namespace).get("generationReplicas") == 4, "4 ready replicas"
    )
    cluster.wait_for_phase(JOB, namespace, "Running")
    assert table(cluster, namespace, "-o", "wide")["GENERATION REPLICAS"] == "4"
    scaled = scale_subresource(cluster, namespace)
    assert scaled["kind"] == "Scale" and scaled["spec"]["replicas"] == 4
    assert scaled["status"] == {"replicas": 4, "selector": GENERATION_SELECTOR}

    patch_replicas(cluster, namespace, 2)  # the same field, written without the subresource
    cluster.wait_for(
        lambda: generation_pods(cluster, namespace) == expected[:2], "back to 2 generation pods"
    )
    cluster.wait_for(
        lambda: cluster.status(JOB, namespace).get("generationReplicas") == 2, "2 ready replicas"
    )
    scaled_down = [e["message"] for e in cluster.events(namespace) if e["reason"] == "ScaledDown"]
    assert sorted(scaled_down) == [
        f"deleted pod {JOB}-generation-2: generation.replicas is 2",
        f"deleted pod {JOB}-generation-3: generation.replicas is 2",
    ]


def test_replicas_below_one_are_refused_naming_the_field(cluster: Cluster, namespace: str) -> None:
    cluster.apply(example_job(JOB, namespace))
    run_pods(cluster, namespace, 4)
    cluster.wait_for_phase(JOB, namespace, "Running")
    # The CRD's minimum (1) makes a real API server refuse this; the emulator stores it, and
    # the operator refuses it itself, keeping the running pods.
    crd = yaml.safe_load((ROOT / "crds" / "rlhfjob.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["properties"]["generation"]["properties"]["replicas"]["minimum"] == 1
    scale(cluster, namespace, 0)

    def rejected() -> list[str]:
        return [e["message"] for e in cluster.events(namespace) if e["reason"] == "UpdateRejected"]

    (message,) = cluster.wait_for(rejected, "the UpdateRejected event")
    assert "spec.generation.replicas" in message
    assert generation_pods(cluster, namespace) == [f"{JOB}-generation-0"]

    def spec_accepted() -> dict[str, Any]:
        found = [
            c
            for c in cluster.status(JOB, namespace).get("conditions", [])
            if c["type"] == "SpecAccepted"
        ]
        return found[0] if found else {}

    refused = cluster.wait_for(spec_accepted, "the SpecAccepted condition")
    assert refused["status"] == "False" and refused["reason"] == "UpdateRejected"
    assert "spec.generation.replicas" in refused["message"]
    # The job keeps running on the spec it last accepted: a failed pod is still recreated.
    pod = f"{JOB}-generation-0"
    first_uid = cluster.peek("v1/pods", namespace)[pod]["metadata"]["uid"]
    cluster.set_pod_status(namespace, pod, "Failed")
    cluster.wait_for(
        lambda: (
            (p := cluster.peek("v1/pods", namespace).get(pod)) is not None
            and p["metadata"]["uid"] != first_uid
        ),
        "the failed generation pod recreated under the last accepted spec",
    )
    assert cluster.status(JOB, namespace)["restarts"] == 1
    # A valid scale is taken again, and says so.
    scale(cluster, namespace, 2)
    cluster.wait_for(
        lambda: spec_accepted().get("status") == "True", "SpecAccepted True after a valid scale"
    )
    cluster.wait_for(
        lambda: generation_pods(cluster, namespace) == [f"{JOB}-generation-{i}" for i in range(2)],
        "2 generation pods",
    )


def test_render_prints_the_children_the_operator_creates(cluster: Cluster, namespace: str) -> None:
    doc = example_job(JOB, namespace)
    manifest = cluster.workdir / f"{namespace}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    rendered = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "render", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    cluster.apply(doc)
    job = cluster.wait_for(lambda: cluster.get("rlhfjob", JOB, namespace), "the job")
    uid = job["metadata"]["uid"]
    plurals = {
        "ConfigMap": "v1/configmaps",
        "Secret": "v1/secrets",
        "Service": "v1/services",
        "Pod": "v1/pods",
        "PersistentVolumeClaim": "v1/persistentvolumeclaims",
        "Deployment": "apps/v1/deployments",
        "NetworkPolicy": "networking.k8s.io/v1/networkpolicies",
    }

    def live(obj: dict[str, Any]) -> dict[str, Any] | None:
        return cluster.peek(plurals[obj["kind"]], namespace).get(obj["metadata"]["name"])

    cluster.wait_for(lambda: all(live(o) for o in objects), "every rendered object created")
    by_kind: dict[str, int] = {}
    for obj in objects:
        by_kind[obj["kind"]] = by_kind.get(obj["kind"], 0) + 1
        created = live(obj)
        assert created is not None
        assert created["metadata"]["ownerReferences"][0]["uid"] == uid
        assert created["metadata"]["labels"] == obj["metadata"]["labels"]
        for field in ("spec", "data", "type"):
            if obj["kind"] == "Secret" and field == "data":
                # Generated at create time: the same keys, never the rendered values.
                assert sorted(created["data"]) == sorted(obj["data"])
                assert created["data"] != obj["data"]
            elif obj["kind"] == "ConfigMap" and field == "data":
                # The stored job carries annotations tools add (kubectl's last-applied
                # configuration, the operator's bookkeeping); everything else is the same.
                live_job, rendered_job = (
                    yaml.safe_load(o["data"]["job.yaml"]) for o in (created, obj)
                )
                live_job["metadata"].pop("annotations", None)
                assert live_job == rendered_job
            else:
                assert created.get(field) == obj.get(field), (obj["kind"], field)
    # Every child of the job is one the render printed, and none is missing.
    for kind, count in by_kind.items():
        children = [
            o
            for o in cluster.peek(plurals[kind], namespace).values()
            if (o["metadata"].get("ownerReferences") or [{}])[0].get("uid") == uid
        ]
        assert len(children) == count, kind
