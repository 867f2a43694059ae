"""The Helm chart: lint, render, validate every object, reject bad values, CRD in sync."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_operator.metrics import Registry
from rlhfspec_operator.rbac import rbac_manifests

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rlhfspec"
K8S_VERSION = "1.32.0"

NON_DEFAULT_VALUES = {
    "watchNamespaces": ["team-a", "team-b"],
    "replicaCount": 2,
    "peering": {"enabled": True, "name": "rlhf-peers"},
    "image": {
        "repository": "registry.example/rlhfspec/operator",
        "tag": "9.9.9",
        "pullPolicy": "Always",
    },
    "metrics": {
        "enabled": True,
        "port": 9500,
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
    },
    "logLevel": "DEBUG",
    "grafana": {
        "dashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "RLHF"},
        }
    },
    "allowedImages": ["ghcr.io/rlhfspec/*", "redis:7.4-alpine"],
    "coordinator": {"allowedHosts": ["*.infra.svc", "redis.shared.example"]},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [
            {"ipBlock": {"cidr": "10.0.0.0/8"}},
            {"podSelector": {"matchLabels": {"app": "prometheus"}}},
        ],
    },
}


def helm_binary() -> str:
    found = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    assert Path(found).exists(), "helm not found: run ./.ci/setup (extracts it to .tools/bin)"
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


def render(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", "rlhf-system", "--include-crds"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_lint_default_and_non_default_values(tmp_path: Path) -> None:
    assert helm("lint", "--strict", str(CHART)).returncode == 0
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT_VALUES))
    result = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_rendered_builtin_objects_are_valid_kubernetes(
    tmp_path: Path, values: dict[str, Any] | None
) -> None:
    docs = render(tmp_path, values)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a prometheus-operator CRD kind, not a built-in one
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 6


def test_all_namespaces_uses_a_cluster_role(tmp_path: Path) -> None:
    docs = render(tmp_path)
    assert "Role" not in kinds(docs)
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    expected = next(d for d in rbac_manifests(None) if d["kind"] == "ClusterRole")
    assert cluster_role["rules"] == expected["rules"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_watch_namespaces_use_roles_per_namespace(tmp_path: Path) -> None:
    docs = render(tmp_path, NON_DEFAULT_VALUES)
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    # Namespaced mode grants nothing cluster-wide, and exactly the operator's rules per namespace.
    assert "ClusterRole" not in kinds(docs)
    expected = rbac_manifests(["team-a", "team-b"], peering=True)
    for role in roles:
        want = next(
            d
            for d in expected
            if d["kind"] == "Role" and d["metadata"]["namespace"] == role["metadata"]["namespace"]
        )
        assert role["rules"] == want["rules"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--peering=rlhf-peers" in args
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_operator_pod_is_non_root_and_read_only(tmp_path: Path) -> None:
    deployment = next(d for d in render(tmp_path) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == "ghcr.io/rlhfspec/operator:0.1.0"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"replicaCount": "two"}, "replicaCount: Invalid type. Expected: integer, given: string"),
        ({"watchNamespaces": "team-a"}, "watchNamespaces: Invalid type. Expected: array"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "image.pullPolicy"),
        ({"metrics": {"port": 70000}}, "metrics.port: Must be less than or equal to 65535"),
        ({"logLevel": "TRACE"}, "logLevel: logLevel must be one of the following"),
        ({"watchNamespace": ["a"]}, "Additional property watchNamespace is not allowed"),
        (
            {"grafana": {"dashboard": {"enabled": "yes"}}},
            "grafana.dashboard.enabled: Invalid type. Expected: boolean",
        ),
        ({"allowedImages": "ghcr.io/*"}, "allowedImages: Invalid type. Expected: array"),
        (
            {"coordinator": {"allowedHosts": ["redis:6379"]}},
            "coordinator.allowedHosts.0: Does not match pattern",
        ),
        (
            {"networkPolicy": {"metricsFrom": [{"podSelecter": {}}]}},
            "Additional property podSelecter is not allowed",
        ),
    ],
    ids=[
        "replicas-string",
        "namespaces-string",
        "pull-policy",
        "port",
        "log-level",
        "typo",
        "dashboard-flag",
        "images-string",
        "host-with-port",
        "peer-typo",
    ],
)
def test_wrong_values_fail_on_the_schema(
    tmp_path: Path, values: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    for command in (["lint", str(CHART)], ["template", "rel", str(CHART)]):
        result = helm(*command, "-f", str(path))
        assert result.returncode != 0
        assert expected in result.stdout + result.stderr


def test_chart_crd_equals_generated_crd() -> None:
    assert (CHART / "crds" / "rlhfjob.yaml").read_text() == (
        ROOT / "crds" / "rlhfjob.yaml"
    ).read_text(), "copy crds/rlhfjob.yaml to charts/rlhfspec/crds/"


def test_notes_tell_the_first_commands(tmp_path: Path) -> None:
    # `helm install --dry-run` needs a cluster; render NOTES.txt through `tpl` in a copy.
    chart = tmp_path / "rlhfspec"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "notes.txt") . | quote }}}\n'
    )
    result = helm(
        "template", "rel", str(chart), "-n", "rlhf-system", "--show-only", "templates/zz-notes.yaml"
    )
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "kubectl apply -f examples/tiny-grpo.yaml" in notes
    assert "kubectl get rlhfjobs" in notes
    assert "It watches all namespaces." in notes


DASHBOARD = CHART / "dashboards" / "rlhfspec.json"


def exported_names() -> set[str]:
    """Every series name the dashboard may query: workers, operator, re-exported vLLM."""
    from rlhfspec_workers.observability import WorkerMetrics
    from rlhfspec_workers.tinymodels.engine import SPEC_COUNTERS

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    names = {
        family.name + suffix
        for family in WorkerMetrics("j", "generation", "w").registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    operator_text = Registry().render()
    names |= {
        line.split()[2] + ("_total" if line.split()[3] == "counter" else "")
        for line in operator_text.splitlines()
        if line.startswith("# TYPE")
    }
    return names | {name + "_total" for name in SPEC_COUNTERS}


def test_grafana_dashboard_ships_only_when_enabled_and_queries_real_metrics(
    tmp_path: Path,
) -> None:
    assert not [d for d in render(tmp_path) if d["kind"] == "ConfigMap"]
    maps = [d for d in render(tmp_path, NON_DEFAULT_VALUES) if d["kind"] == "ConfigMap"]
    assert len(maps) == 1
    meta = maps[0]["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["annotations"] == {"grafana_folder": "RLHF"}
    shipped = json.loads(maps[0]["data"]["rlhfspec.json"])
    assert shipped == json.loads(DASHBOARD.read_text())

    panels = [p for p in shipped["panels"] if p["type"] != "row"]
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Per job: every query is filtered by the dashboard's namespace and job variables.
            assert 'namespace=~"$namespace", job=~"$job"' in target["expr"], panel["title"]
            queried |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", target["expr"]))
    unknown = queried - exported_names()
    assert not unknown, f"dashboard queries metrics nobody exports: {sorted(unknown)}"
    # The list: each of these is on the dashboard.
    for name in (
        "rlhfspec_reward_mean",
        "rlhfspec_kl",
        "rlhfspec_policy_loss",
        "rlhfspec_value_loss",
        "rlhfspec_stage_seconds",
        "rlhfspec_generation_tokens_total",
        "rlhfspec_generation_running_batch_size",
        "rlhfspec_spec_k",
        "rlhfspec_spec_drafter",
        "rlhfspec_spec_k_chosen_bucket",
        "rlhfspec_spec_accepted_tokens_total",
        "rlhfspec_calibration_age_seconds",
        "rlhfspec_strategy_table_version",
        "rlhfspec_migrations_total",
        "rlhfspec_migrated_tokens_total",
        "rlhfspec_migration_seconds_bucket",
        "rlhfspec_samples_reclaimed_total",
        "rlhfspec_weight_version",
        "vllm:spec_decode_num_accepted_tokens_total",
        "rlhfspec_job_phase",
    ):
        assert name in queried, name
    ids = [p["id"] for p in shipped["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in shipped["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}


def test_worker_service_monitor_selects_every_jobs_role_services(tmp_path: Path) -> None:
    from rlhfspec_api.manifest import parse_rlhfjob
    from rlhfspec_operator import builders
    from rlhfspec_operator.naming import WORKER_ROLES, Owner

    docs = render(tmp_path, NON_DEFAULT_VALUES)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"rel-rlhfspec", "rel-rlhfspec-workers"}
    assert all(m["spec"]["endpoints"][0]["honorLabels"] is True for m in monitors.values())
    spec = monitors["rel-rlhfspec-workers"]["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}

    example = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    example["metadata"]["namespace"] = "team-a"
    job = parse_rlhfjob(example)
    owner = Owner(job.name, job.namespace, "0b6c5f9e-7d1e-4d0a-9c55-2f1e3c4b5a69")
    services = [builders.role_service(job, owner, role) for role in WORKER_ROLES]
    selected = [
        svc
        for svc in builders.children(job, owner, password="x", operator_namespace="ops")
        if svc["kind"] == "Service" and matches(spec["selector"], svc["metadata"]["labels"])
    ]
    # Exactly the role Services (not Redis), each with the port the endpoint names.
    assert [s["metadata"]["name"] for s in selected] == [s["metadata"]["name"] for s in services]
    for svc in selected:
        assert spec["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]

    default = render(
        tmp_path,
        {
            **NON_DEFAULT_VALUES,
            "watchNamespaces": [],
            "metrics": {"serviceMonitor": {"enabled": True}},
        },
    )
    workers = next(d for d in default if d["metadata"]["name"] == "rel-rlhfspec-workers")
    assert workers["spec"]["namespaceSelector"] == {"any": True}
    off = render(tmp_path, {"metrics": {"serviceMonitor": {"enabled": True, "workers": False}}})
    assert [d["metadata"]["name"] for d in off if d["kind"] == "ServiceMonitor"] == ["rel-rlhfspec"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


# --- issue #17: what a job may ask, who may scrape (findings 8, 9, 2) -------------------------


def test_admission_values_reach_the_operator_as_flags_it_parses(tmp_path: Path) -> None:
    from rlhfspec_operator.main import build_parser

    deployment = next(d for d in render(tmp_path, NON_DEFAULT_VALUES) if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args[1:])  # args[0] is the `operator` subcommand
    assert parsed.allowed_images == NON_DEFAULT_VALUES["allowedImages"]
    assert parsed.allowed_redis_hosts == NON_DEFAULT_VALUES["coordinator"]["allowedHosts"]
    assert parsed.metrics_from == NON_DEFAULT_VALUES["networkPolicy"]["metricsFrom"]
    # Defaults: any image, no external Redis host, Prometheus in `monitoring` scrapes.
    default = next(d for d in render(tmp_path) if d["kind"] == "Deployment")
    args = default["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args[1:])
    assert parsed.allowed_images is None and parsed.allowed_redis_hosts is None
    assert parsed.metrics_from == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]


def test_operator_metrics_are_open_only_to_metrics_from(tmp_path: Path) -> None:
    docs = render(tmp_path, NON_DEFAULT_VALUES)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    health, metrics = policy["spec"]["ingress"]
    assert health == {"ports": [{"protocol": "TCP", "port": 8080}]}  # the kubelet's probes
    assert metrics == {
        "from": NON_DEFAULT_VALUES["networkPolicy"]["metricsFrom"],
        "ports": [{"protocol": "TCP", "port": 9500}],
    }
    closed = render(tmp_path, {"networkPolicy": {"metricsFrom": []}})
    policy = next(d for d in closed if d["kind"] == "NetworkPolicy")
    assert [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]] == [8080]
    off = render(tmp_path, {"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(off)


def test_readme_says_what_creating_a_job_grants_and_documents_every_new_value() -> None:
    readme = (CHART / "README.md").read_text()
    assert "## What creating an RLHFJob grants" in readme
    for value in (
        "allowedImages",
        "coordinator.allowedHosts",
        "networkPolicy.metricsFrom",
        "rlhfspec.io/coordinator-password",
    ):
        assert value in readme, value


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_install_builder_configures_the_operator_as_the_chart_does(
    tmp_path: Path, values: dict[str, Any] | None
) -> None:
    """``install.py`` is the chart's reference: for the same values, the operator it deploys
    parses to the same settings and exposes the same ports."""
    from rlhfspec_operator import install
    from rlhfspec_operator.main import build_parser

    chart = next(d for d in render(tmp_path, values) if d["kind"] == "Deployment")
    v = values or yaml.safe_load((CHART / "values.yaml").read_text())
    settings = install.OperatorSettings(
        metrics_port=v["metrics"]["port"] if v["metrics"]["enabled"] else None,
        allowed_images=tuple(v["allowedImages"]),
        allowed_redis_hosts=tuple(v["coordinator"]["allowedHosts"]),
        metrics_from=tuple(v["networkPolicy"]["metricsFrom"]),
        log_level=v["logLevel"],
    )
    ours = install.operator_deployment(
        v["watchNamespaces"] or None,
        peering=v["peering"]["name"] if v["peering"]["enabled"] else None,
        settings=settings,
    )
    containers = [d["spec"]["template"]["spec"]["containers"][0] for d in (chart, ours)]
    parsed = [vars(build_parser().parse_args(c["args"][1:])) for c in containers]
    assert parsed[0] == parsed[1]
    ports = [{p["name"]: p["containerPort"] for p in c["ports"]} for c in containers]
    assert ports[0] == ports[1]
    assert ports[1]["metrics"] == v["metrics"]["port"]  # enabled by default too
