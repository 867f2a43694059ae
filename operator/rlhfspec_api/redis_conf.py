"""The coordinator Redis' ``redis.conf`` and its AOF start-up check: one text, pods and local mode.

Where it sits: the operator renders :func:`redis_config` into the managed Redis' Secret and runs
:data:`AOF_CHECK_SCRIPT` in the Deployment's init container (``rlhfspec_operator.managed_redis``);
``rlhfspec run`` writes the same file and runs the same script before its ``redis-server``
(``rlhfspec_workers.local.redis_server``), so the tests exercise the configuration pods get.
Pure text, no I/O: both control plane and data plane import it.

Durability: the coordinator's state (task, rollout and experience streams, consumer groups,
dedupe sets) lives only in Redis, and workers ack entries once their effect is durable, so an
acknowledged write must survive a crash of the Redis process or its pod. The AOF is fsynced on
every write (``appendfsync always``): ``everysec`` may lose the last second of acknowledged
writes on a crash, and the job's message rate (hundreds of small writes a second at most) is
far below what an fsync per write costs. ``aof-load-truncated no`` makes Redis refuse a damaged
AOF instead of repairing it silently; the check script is the one place that repairs, and it
says what it did.
"""

from __future__ import annotations

AOF_DIRNAME = "appendonlydir"
"""Redis 7 keeps its multi-part AOF (a manifest, a base file, incremental files) here."""
AOF_MANIFEST = "appendonly.aof.manifest"
AOF_CHECK_PREFIX = "rlhfspec redis-aof-check:"
"""Every line the check script prints starts with it (easy to find in a pod's log)."""


def _quoted(field: str, value: str) -> str:
    """``value`` as a redis.conf argument: bare when it holds no syntax, else double-quoted
    (backslash and quote escaped); control characters are refused."""
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(
            f"{field}: {value!r} is not allowed in redis.conf (a non-empty value without "
            "control characters)"
        )
    if all(c.isalnum() or c in "_-./:+=@" for c in value):
        return value  # nothing the parser reads as syntax: as written
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def redis_config(
    *,
    port: int,
    data_dir: str,
    password: str | None = None,
    bind: str | None = None,
    logfile: str = "",
) -> str:
    """The coordinator Redis' config file. ``logfile`` empty logs to stdout (a pod's log)."""
    if not 0 < port < 65536:
        raise ValueError(f"port: {port} is out of range (1-65535)")
    lines = [f"port {port}"]
    if bind is not None:
        lines.append(f"bind {bind}")
    if password:
        # Here, not on the command line where `ps` and the pod spec would show it.
        lines.append(f"requirepass {_quoted('password', password)}")
    lines += [
        'save ""',  # no RDB snapshots: the AOF is the one durable copy
        "appendonly yes",
        f'appenddirname "{AOF_DIRNAME}"',
        "appendfsync always",
        "aof-load-truncated no",
        f"dir {_quoted('data_dir', data_dir)}",
        "protected-mode no",
        "daemonize no",
        f"logfile {_quoted('logfile', logfile)}" if logfile else 'logfile ""',
        "",
    ]
    return "\n".join(lines)


AOF_CHECK_SCRIPT = r"""
set -u
dir="$1"
say() { echo "rlhfspec redis-aof-check: $*"; }
aof="$dir/appendonlydir"
manifest="$aof/appendonly.aof.manifest"
if ! mkdir -p "$dir"; then
  say "cannot create the Redis data directory $dir"
  exit 1
fi
if [ ! -f "$manifest" ]; then
  if [ -d "$aof" ] && [ -n "$(ls -A "$aof")" ]; then
    say "$aof holds AOF files but no manifest: refusing to start, Redis would load an" \
      "empty state and lose the job's acknowledged writes; restore the manifest or move" \
      "$aof away"
    exit 1
  fi
  say "no AOF in $dir yet: a new Redis starts empty"
  exit 0
fi
if report=$(redis-check-aof "$manifest" 2>&1); then
  say "AOF in $aof is valid"
  exit 0
fi
analyzed=$(printf '%s\n' "$report" | grep 'AOF analyzed:' | tail -n 1)
say "AOF in $aof is damaged: ${analyzed:-$report}"
file=$(printf '%s\n' "$analyzed" | sed -n 's/.*filename=\([^,]*\),.*/\1/p')
ok=$(printf '%s\n' "$analyzed" | sed -n 's/.*ok_up_to=\([0-9]*\),.*/\1/p')
cut=$(printf '%s\n' "$analyzed" | sed -n 's/.*diff=\([0-9]*\).*/\1/p')
last=$(grep ' type i' "$manifest" | tail -n 1 | sed -n 's/^file \([^ ]*\) .*/\1/p')
if [ -z "$file" ] || [ -z "$ok" ] || [ "$file" != "$last" ]; then
  say "the damage is not at the end of the last incremental file ($last): cannot" \
    "repair without losing acknowledged writes; refusing to start. Inspect with:" \
    "redis-check-aof $manifest"
  exit 1
fi
# A crash mid-write leaves one partial command at the end (never acknowledged: fsync comes
# before the reply). Any later command start after the damaged one means corruption inside
# the file, which --fix would "repair" by dropping every acknowledged write after it.
# (grep without -a: busybox grep, in the alpine images, has no -a and reads binary as text;
# GNU grep with -q still reports a match in a binary file. Exit 2 is an error: fail closed.)
tail -c +"$((ok + 1))" "$aof/$file" | tail -n +2 | grep -q '^\*'
later=$?
if [ "$later" -gt 1 ]; then
  say "cannot read $aof/$file to tell a cut-off tail from damage; refusing to start"
  exit 1
fi
if [ "$later" -eq 0 ]; then
  say "$file is corrupt at byte $ok with complete commands after it: not a cut-off" \
    "tail; refusing to start (a repair would drop $cut bytes of acknowledged writes)." \
    "Inspect with: redis-check-aof $manifest"
  exit 1
fi
say "$file ends in a partial command cut off by a crash (never acknowledged):" \
  "removing its $cut bytes at byte $ok with redis-check-aof --fix"
if ! fixed=$(echo y | redis-check-aof --fix "$manifest" 2>&1); then
  say "redis-check-aof --fix failed: $fixed"
  exit 1
fi
if ! redis-check-aof "$manifest" >/dev/null 2>&1; then
  say "the AOF is still damaged after the repair; refusing to start"
  exit 1
fi
say "repaired: $file truncated to $ok bytes; Redis starts with every complete command"
exit 0
""".lstrip()
"""POSIX sh, run as ``sh -c SCRIPT sh DATA_DIR`` with ``redis-check-aof`` on PATH (the Redis
image has it). Exit 0: the AOF is valid, absent, or had its cut-off tail repaired; exit 1 with
a message: anything else, so the pod fails instead of Redis loading a state missing writes."""


def aof_check_command(data_dir: str) -> list[str]:
    """The argv that runs :data:`AOF_CHECK_SCRIPT` on ``data_dir``."""
    return ["sh", "-c", AOF_CHECK_SCRIPT, "sh", data_dir]
