"""A stand-in for ``rlhfspec worker <role>`` that checks the pod contract and fakes progress.

Where it sits: ``test_operator_kubelet`` runs it through the process kubelet in place of the
real worker entry point, so the contract the operator builds (env, mounts, the managed Redis
and its password) is exercised end to end before the data plane exists. Every role asserts
its environment, registers in Redis and waits; the coordinator waits for all of them, then
writes ``JobProgress`` for every iteration of ``job.yaml`` and exits 0 (the job succeeds).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import redis
import yaml

from rlhfspec_workers.messages import JobProgress, Keys


def main(role: str) -> int:
    env = os.environ
    assert env["RLHFSPEC_ROLE"] == role, env["RLHFSPEC_ROLE"]
    job, namespace = env["RLHFSPEC_JOB"], env["RLHFSPEC_NAMESPACE"]
    config = yaml.safe_load(Path(env["RLHFSPEC_JOB_CONFIG"]).read_text())
    assert config["metadata"]["name"] == job, config["metadata"]
    replicas = int(env["RLHFSPEC_REPLICAS"])
    assert replicas == config["spec"]["generation"]["replicas"]
    storage = Path(env["RLHFSPEC_STORAGE"])
    (storage / f"{env['RLHFSPEC_POD_NAME']}.touch").write_text("ok")  # shared, writable
    int(env["RLHFSPEC_METRICS_PORT"])
    client = redis.Redis.from_url(
        env["RLHFSPEC_REDIS_URL"], password=env["RLHFSPEC_REDIS_PASSWORD"]
    )
    keys = Keys(namespace, job)
    index = int(env["RLHFSPEC_WORKER_INDEX"])
    # Redis may come up after the workers (it does on a cluster too): retry, as workers must.
    deadline = time.monotonic() + 60
    while True:
        try:
            client.set(f"{keys.prefix}:fake:{role}:{index}", b"up")
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if role != "coordinator":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(1)
    expected = 2 + replicas  # inference, trainer, generation x replicas
    while len(client.keys(f"{keys.prefix}:fake:*")) < expected + 1:
        time.sleep(0.1)
    total = int(config["spec"]["algorithm"]["iterations"])
    for iteration in range(1, total + 1):
        progress = JobProgress(
            iteration=iteration,
            total_iterations=total,
            strategy="suffix:k=4",
            tokens_per_second=100.0 * iteration,
            mean_accepted_length=2.5,
            reward_mean=0.1 * iteration,
            kl=0.01,
            updated_at=time.time(),
            state="succeeded" if iteration == total else "running",
        )
        client.set(keys.progress, progress.to_bytes())
        time.sleep(0.3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
