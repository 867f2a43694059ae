"""An embedded ``redis-server`` process for local mode and tests.

Where it sits: ``rlhfspec run`` starts one per job (the coordinator's store, like the managed
Redis the operator deploys on a cluster); the test suite starts one per session. It is always
the real Debian ``redis-server`` binary, never an in-memory fake, so persistence (AOF), restarts
and outages behave as they do in production. Its ``redis.conf`` and the AOF check run before
every start are the managed Redis' own (``rlhfspec_api.redis_conf``): a tail cut off by a crash
is repaired and reported in ``redis.log``, any other damage stops the start with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from rlhfspec_api.redis_conf import aof_check_command, redis_config

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it with `sudo apt-get install redis-server` "
    "(Debian/Ubuntu), or run ./.ci/setup which does it for you."
)


class RedisNotInstalledError(RuntimeError):
    """redis-server is missing; the message says how to install it."""


class AofDamagedError(RuntimeError):
    """The AOF check refused to start Redis (damage that a repair would lose writes to)."""


def find_redis_server() -> str:
    """Path of the redis-server binary, or RedisNotInstalledError with the install hint."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisNotInstalledError(INSTALL_HINT)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server child process bound to 127.0.0.1, with its data in ``workdir``.

    ``appendonly`` defaults to on with fsync every write: nothing acknowledged may be lost
    across a restart (the coordinator's fault tests restart it on purpose). The config file is
    ``workdir/redis.conf`` (owner-only: it holds the password).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
    ) -> None:
        # redis-server changes into --dir before it opens --logfile: both must be absolute.
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self.aof_check_report = ""
        """What the AOF check said at the last start."""

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    def _command(self) -> list[str]:
        config = redis_config(
            port=self.port,
            data_dir=str(self.workdir),
            password=self.password,
            bind="127.0.0.1",
            logfile=str(self.workdir / "redis.log"),
        )
        self.config_path.touch(mode=0o600)
        self.config_path.chmod(0o600)
        self.config_path.write_text(config, encoding="utf-8")
        command = [find_redis_server(), str(self.config_path)]
        if not self.appendonly:
            command += ["--appendonly", "no"]
        return command

    def check_aof(self) -> str:
        """Run the managed Redis' AOF check on ``workdir`` (repairs a cut-off tail); its
        report goes to ``redis.log``. AofDamagedError with the report when it refuses."""
        result = subprocess.run(
            aof_check_command(str(self.workdir)), capture_output=True, text=True, timeout=120
        )
        report = (result.stdout + result.stderr).strip()
        with (self.workdir / "redis.log").open("a", encoding="utf-8") as log:
            log.write(report + "\n")
        self.aof_check_report = report
        if result.returncode != 0:
            raise AofDamagedError(f"redis-server not started: {report}")
        return report

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it answers PING; return its URL."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        if self.appendonly:
            self.check_aof()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.workdir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start: {err or tail}")
            if self.ping():
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        """True when the server answers PING (raw RESP, so this module needs no client)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM flushes the AOF), killing after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests (the AOF with fsync always still has every write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> str:
        """Stop (or after kill: reap) and start again on the same port and data directory."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
