"""A "process kubelet": runs the pods the operator creates as local processes, reports phases.

Where it sits: between the emulator (which has no nodes) and the worker entry points. It polls
the emulator for pods of one namespace and, for each new one, starts its container command as
a local process with the pod's environment resolved the way a kubelet would (``value``,
``secretKeyRef``, ``fieldRef``). A node's isolation is mapped onto one machine:

* volumes become directories: a ConfigMap volume is written out, a claim is one directory per
  claim shared by all pods, an emptyDir is per pod; env values under a mount path are rewritten;
* each container port gets a free local port (env ``*_PORT`` values that name it are rewritten);
* the cluster DNS of the managed Redis (``redis://<job>-redis.<ns>.svc:6379``) points to a local
  ``redis-server`` the kubelet starts up front (the operator is given its URL with
  ``--coordinator-url``: :attr:`ProcessKubelet.redis_url`) and protects with the password of
  the job's Secret once that exists;
* ``rlhfspec`` in a command is this interpreter's ``python -m rlhfspec_cli``;
* ``host_env`` names (e.g. ``HOME``) keep this process's values whatever the pod says: the
  image's caches (tiny models, vLLM) are the test user's here; ``extra_env`` stands in for what
  the image's environment and the pod's CPU limit give (``OMP_NUM_THREADS=1``).

With ``command=None`` (the real worker command) every pod is the data plane for real; a
``command`` function runs something else in its place (``fake_worker.py``). Each process gets
its own session, and its whole process group is stopped with it (vLLM starts helpers).

The phase goes Pending -> Running when the process starts, Succeeded/Failed (with the exit
code in ``containerStatuses``) when it exits; a deleted pod's process gets SIGTERM. One
managed job per kubelet (one local Redis).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import redis
from cluster import Cluster, free_port

CommandFn = Callable[[dict[str, Any]], list[str]]
_SERVICE_REDIS = re.compile(r"^redis://[a-z0-9-]+-redis\.[a-z0-9-]+\.svc:\d+(/\d+)?$")
# One thread per worker process, as a 1-CPU pod gets; the log is written as it happens.
DEFAULT_EXTRA_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STOP_GRACE_SECONDS = 15.0


class ProcessKubelet:
    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        workdir: Path,
        command: CommandFn | None = None,
        *,
        host_env: Sequence[str] = (),
        extra_env: Mapping[str, str] = DEFAULT_EXTRA_ENV,
    ) -> None:
        self.cluster, self.namespace, self.workdir = cluster, namespace, workdir
        self.command = command
        self.host_env = tuple(host_env)
        self.extra_env = dict(extra_env)
        self.redis_port = 0
        self.redis_url = ""
        self._password_set = False
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # pod uid -> process
        self.exits: dict[str, int] = {}  # pod name -> exit code of its last process
        self._names: dict[str, str] = {}  # pod uid -> pod name
        self._logs: list[IO[bytes]] = []
        self._redis: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-kubelet", daemon=True)
        self.errors: list[str] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_redis()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._terminate(*self.processes.values())
        if self._redis is not None:
            self._terminate(self._redis)
        for log in self._logs:
            log.close()

    def log(self, pod: str) -> str:
        path = self.workdir / "pods" / pod / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, lines: int = 30) -> str:
        """The end of every pod's log, for a failing test's message."""
        pods = sorted(p.name for p in (self.workdir / "pods").glob("*") if p.is_dir())
        tails = [
            f"--- {pod} (exit {self.exits.get(pod, 'none')}) ---\n"
            + "\n".join(self.log(pod).splitlines()[-lines:])
            for pod in pods
        ]
        return "\n".join(tails)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # keep running; the test reads self.errors
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)

    def _sync(self) -> None:
        self._ensure_password()
        pods = self.cluster.peek("v1/pods", self.namespace)
        live = {p["metadata"]["uid"]: p for p in pods.values()}
        deleted = []
        for uid, process in list(self.processes.items()):
            pod = live.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                deleted.append(self.processes.pop(uid))
            elif process.poll() is not None:
                del self.processes[uid]
                self._kill_group(process)  # helpers a worker left behind
                self._report_exit(self._names[uid], process.returncode)
        self._terminate(*deleted)  # all at once: a job's end deletes every pod together
        for uid, pod in live.items():
            if uid in self._names or pod["metadata"].get("deletionTimestamp"):
                continue
            self._names[uid] = pod["metadata"]["name"]
            self.processes[uid] = self._launch(pod)
            self.cluster.set_pod_status(self.namespace, self._names[uid], "Running")

    # --- the managed Redis ---------------------------------------------------------------------

    def _start_redis(self) -> None:
        """Bind the Redis port now (the operator is told the URL before any Secret exists);
        the password is set when the job's Secret appears, as the Deployment would read it."""
        for _ in range(3):  # a free port can be taken between probing and binding
            self.redis_port = free_port()
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
            log = (self.workdir / "redis.log").open("ab")
            self._logs.append(log)
            self._redis = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a "container" too: stopped with its group
            )
            client = redis.Redis(port=self.redis_port, socket_connect_timeout=1)
            deadline = time.monotonic() + 30
            while self._redis.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    client.close()
                    return
                time.sleep(0.1)
            self._terminate(self._redis)
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def _ensure_password(self) -> None:
        if self._password_set:
            return
        secrets = self.cluster.peek("v1/secrets", self.namespace)
        secret = next((s for n, s in secrets.items() if n.endswith("-redis")), None)
        if secret is None:
            return
        password = base64.b64decode(secret["data"]["password"]).decode()
        client = redis.Redis(port=self.redis_port)
        client.config_set("requirepass", password)
        client.close()
        self._password_set = True

    # --- pods ----------------------------------------------------------------------------------

    def _volume_dirs(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """mountPath -> local directory, with ConfigMap and Secret contents written out."""
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in spec["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
            else:
                local = pod_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            source, decode = None, False
            if "configMap" in volume:
                source = self.cluster.peek("v1/configmaps", self.namespace).get(
                    volume["configMap"]["name"]
                )
            elif "secret" in volume:
                source = self.cluster.peek("v1/secrets", self.namespace).get(
                    volume["secret"]["secretName"]
                )
                decode = True
            for key, value in ((source or {}).get("data") or {}).items():
                content = base64.b64decode(value) if decode else str(value).encode()
                (local / key).write_bytes(content)
            mounts[mount["mountPath"]] = local
        return mounts

    def _env(self, pod: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        container = pod["spec"]["containers"][0]
        ports = {str(p["containerPort"]): str(free_port()) for p in container.get("ports", [])}
        secrets = self.cluster.peek("v1/secrets", self.namespace)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RLHFSPEC_") or k in self.host_env
        }
        env.update(self.extra_env)
        for item in container.get("env", []):
            name = item["name"]
            if "value" in item:
                value = str(item["value"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
            else:
                field = item["valueFrom"]["fieldRef"]["fieldPath"]
                value = str(pod["metadata"][field.split(".", 1)[1]])
            for path in sorted(mounts, key=len, reverse=True):
                if value == path or value.startswith(path + "/"):
                    value = str(mounts[path]) + value[len(path) :]
                    break
            if name.endswith("_PORT") and value in ports:
                value = ports[value]
            if _SERVICE_REDIS.match(value):
                value = self.redis_url
            if name not in self.host_env:
                env[name] = value
        return env

    def _launch(self, pod: dict[str, Any]) -> subprocess.Popen[bytes]:
        name = pod["metadata"]["name"]
        pod_dir = self.workdir / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = self._volume_dirs(pod, pod_dir)
        env = self._env(pod, mounts)
        if self.command is not None:
            argv = self.command(pod)
        else:
            argv = list(pod["spec"]["containers"][0]["command"])
            if argv and argv[0] == "rlhfspec":
                argv = [sys.executable, "-m", "rlhfspec_cli", *argv[1:]]
        log = (pod_dir / "log").open("ab")
        self._logs.append(log)
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=pod_dir,
            start_new_session=True,  # its own process group: stopped as one, like a container
        )

    def _report_exit(self, name: str, code: int) -> None:
        self.exits[name] = code
        container = self.cluster.peek("v1/pods", self.namespace)[name]["spec"]["containers"][0]
        reason = "Completed" if code == 0 else "Error"
        terminated = {"exitCode": code, "reason": reason}
        statuses = [{"name": container["name"], "state": {"terminated": terminated}}]
        phase = "Succeeded" if code == 0 else "Failed"
        with contextlib.suppress(Exception):  # the pod may have been deleted meanwhile
            self.cluster.set_pod_status(self.namespace, name, phase, containerStatuses=statuses)

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process group this kubelet created for ``process`` (its session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    @classmethod
    def _terminate(cls, *processes: subprocess.Popen[bytes]) -> None:
        """SIGTERM, a grace period (as terminationGracePeriodSeconds), then SIGKILL; the
        group goes too, so no helper outlives its pod."""
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            cls._kill_group(process)
