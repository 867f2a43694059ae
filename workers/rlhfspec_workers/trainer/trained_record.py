"""What the trainer actually trained on: one JSON line per sample of every iteration.

Where it sits: the trainer worker calls :func:`write_trained_record` right after
``PolicyTrainer.train_iteration`` returns, with the very experiences it trained on, before it
checkpoints and publishes. The record is ``<storage>/trained/iter-<N>.jsonl`` (written to a
hidden temp name, fsynced and renamed: a reader sees the whole file or none; a retrained
iteration after a crash replaces it). It answers "which samples went into iteration N, once
each, with what reward and log-probs" without reading the trainer's deduplication state, which
is what the fault tests check and what a user auditing a run wants.

Each line: ``sample_id``, ``prompt_id``, ``weight_version`` (the policy that generated it),
``worker``, ``reward``, ``response_tokens``, ``tokens_sha256`` (of the response token ids),
``logprob_sum`` (the rollout policy's), ``ref_logprob_sum``; sorted by sample id, the order
the trainer collates them. About 300 bytes a sample, so no token or log-prob lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.messages import Experience

DIRECTORY = "trained"


def record_path(storage: Path, iteration: int) -> Path:
    return Path(storage) / DIRECTORY / f"iter-{iteration:06d}.jsonl"


def sample_line(experience: Experience) -> dict[str, Any]:
    rollout = experience.rollout
    tokens = ",".join(str(t) for t in rollout.token_ids).encode()
    return {
        "sample_id": rollout.sample_id,
        "prompt_id": rollout.prompt_id,
        "weight_version": rollout.weight_version,
        "worker": rollout.worker,
        "reward": experience.reward,
        "response_tokens": len(rollout.token_ids),
        "tokens_sha256": hashlib.sha256(tokens).hexdigest(),
        "logprob_sum": float(sum(rollout.logprobs)),
        "ref_logprob_sum": float(sum(experience.ref_logprobs)),
    }


def write_trained_record(storage: Path, iteration: int, experiences: Sequence[Experience]) -> Path:
    """Write iteration ``iteration``'s record atomically; returns its path."""
    path = record_path(storage, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(experiences, key=lambda e: e.rollout.sample_id)
    text = "".join(json.dumps(sample_line(e), sort_keys=True) + "\n" for e in ordered)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial record's bytes
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_trained_record(storage: Path, iteration: int) -> list[dict[str, Any]]:
    """The lines of iteration ``iteration``'s record (FileNotFoundError when it has none)."""
    lines = record_path(storage, iteration).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
