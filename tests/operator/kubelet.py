"""A "process kubelet": runs the pods the operator creates as local processes, reports phases.

Where it sits: between the emulator (which has no nodes) and the worker entry points. It polls
the emulator for pods of one namespace and, for each new one, starts its container command as
a local process with the pod's environment resolved the way a kubelet would (``value``,
``secretKeyRef``, ``fieldRef``). A node's isolation is mapped onto one machine:

* volumes become directories: a ConfigMap volume is written out, a claim is one directory per
  claim shared by all pods, an emptyDir is per pod; env values under a mount path are rewritten;
* each container port gets a free local port (env ``*_PORT`` values that name it are rewritten);
* the managed Redis runs as the operator renders it: once the job's Redis Deployment and its
  Secret exist, the kubelet runs the Deployment's pod template (its init containers, the AOF
  check, to completion, then its container's command: ``redis-server`` on the ``redis.conf``
  from the Secret, password included, with the data mount on the job's claim). Its port is
  bound up front (the operator is given the URL with ``--coordinator-url`` before any Secret
  exists: :attr:`ProcessKubelet.redis_url`), so the container's command gets ``--port`` (the
  local port of its containerPort) and ``--bind 127.0.0.1`` appended, and reads a copy of the
  config whose ``dir`` names the local folder of that mount path (redis-server changes into it
  as it reads the file): the one node's mapping, nothing else of the config changes. The
  cluster DNS of the managed Redis (``redis://<job>-redis.<ns>.svc:6379``) points to it. The
  pod runs as the test user, not the image's ``redis`` user (999); its Deployment gets no
  status (the operator does not wait on it);
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
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

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
        self._redis_pod: str | None = None
        """The managed Redis' pod (its Deployment's, run once): None until it runs."""
        self._said = False
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
        # Bound when the Deployment's pod runs; a port free now stays free on a test host.
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
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
        self._ensure_redis()
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

    def _ensure_redis(self) -> None:
        """Run the job's Redis Deployment's pod once it and the Secret it mounts exist."""
        if self._redis_pod is not None:
            if self._redis is not None and self._redis.poll() is not None and not self._said:
                self._said = True
                self.errors.append(
                    f"redis-server of {self._redis_pod} exited with {self._redis.returncode}; "
                    f"see {self.workdir / 'pods' / self._redis_pod / 'log'}"
                )
            return
        deployments = self.cluster.peek("apps/v1/deployments", self.namespace)
        found = next(((n, d) for n, d in deployments.items() if n.endswith("-redis")), None)
        if found is None:
            return
        name, deployment = found
        spec = deployment["spec"]["template"]["spec"]
        secrets = self.cluster.peek("v1/secrets", self.namespace)
        wanted = [v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v]
        if any(secret not in secrets for secret in wanted):
            return  # the operator creates the Secret first; not seen yet
        self._redis_pod = pod = f"{name}-0"
        pod_dir = self.workdir / "pods" / pod
        pod_dir.mkdir(parents=True, exist_ok=True)
        log = (pod_dir / "log").open("ab")
        self._logs.append(log)
        for init in spec.get("initContainers", []):
            mounts = self._volume_dirs(spec, init, pod_dir)
            argv = [_local(arg, mounts) for arg in [*init["command"], *init.get("args", [])]]
            code = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=pod_dir, env={**os.environ, **self.extra_env}, timeout=120,
            ).returncode  # fmt: skip
            if code != 0:
                self._said = True
                raise RuntimeError(
                    f"init container {init['name']} of {pod} exited with {code}; see "
                    f"{pod_dir / 'log'}"
                )
        container = spec["containers"][0]
        mounts = self._volume_dirs(spec, container, pod_dir)
        argv = [_local(arg, mounts) for arg in [*container["command"], *container.get("args", [])]]
        config = Path(argv[1])
        settings = _redis_settings(config.read_text())
        ports = {int(p["containerPort"]) for p in container.get("ports", [])}
        if int(settings["port"]) not in ports:
            raise RuntimeError(f"{pod}: redis.conf's port {settings['port']} is not in {ports}")
        # redis-server changes into ``dir`` as it reads the file (a command-line --dir comes
        # too late): the node's copy names the local folder; port and bind are arguments.
        local_dir = _local(settings["dir"], mounts)
        mapped = pod_dir / "redis.node.conf"
        mapped.write_text(
            "\n".join(
                f'dir "{local_dir}"' if line.startswith("dir ") else line
                for line in config.read_text().splitlines()
            )
            + "\n"
        )
        argv = [argv[0], str(mapped), *argv[2:]]
        argv += ["--port", str(self.redis_port), "--bind", "127.0.0.1"]
        self._redis = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=pod_dir,
            start_new_session=True,  # a "container" too: stopped with its group
        )

    # --- pods ----------------------------------------------------------------------------------

    def _volume_dirs(
        self, spec: dict[str, Any], container: dict[str, Any], pod_dir: Path
    ) -> dict[str, Path]:
        """mountPath -> local directory, with ConfigMap and Secret contents written out
        (``items`` picks keys and names their files; ``subPath`` mounts a folder of the
        volume, created if missing, as a kubelet does)."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
            else:
                local = pod_dir / "volumes" / mount["name"]
            if mount.get("subPath"):
                local = local / mount["subPath"]
            local.mkdir(parents=True, exist_ok=True)
            source, decode, items = None, False, None
            if "configMap" in volume:
                source = self.cluster.peek("v1/configmaps", self.namespace).get(
                    volume["configMap"]["name"]
                )
                items = volume["configMap"].get("items")
            elif "secret" in volume:
                source = self.cluster.peek("v1/secrets", self.namespace).get(
                    volume["secret"]["secretName"]
                )
                decode, items = True, volume["secret"].get("items")
            data = (source or {}).get("data") or {}
            files = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
            for key, path in files.items():
                value = data[key]
                content = base64.b64decode(value) if decode else str(value).encode()
                (local / path).write_bytes(content)
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
            value = _local(value, mounts)
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
        mounts = self._volume_dirs(pod["spec"], pod["spec"]["containers"][0], pod_dir)
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


def _local(value: str, mounts: Mapping[str, Path]) -> str:
    """``value`` with a mount path (the longest that matches) replaced by its local folder."""
    for path in sorted(mounts, key=len, reverse=True):
        if value == path or value.startswith(path + "/"):
            return str(mounts[path]) + value[len(path) :]
    return value


def _redis_settings(config: str) -> dict[str, str]:
    """The first argument of each directive in a ``redis.conf`` (quotes removed)."""
    settings = {}
    for line in config.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) >= 2:
            settings[words[0]] = words[1]
    return settings
