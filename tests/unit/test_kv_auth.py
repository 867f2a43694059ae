"""What a destination loads of a pulled KV snapshot: only a frame sealed with its own job's key
for exactly that snapshot, describing exactly its engine's cache; anything else is refused
with its reason (and the sample recomputes). Pure: frames are built from bytes, no torch."""

from __future__ import annotations

import time
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhfspec_workers.generation.kv_auth import (
    PULL_TOKEN_WINDOW,
    TAG_BYTES,
    FallbackReason,
    KVAuth,
    KVRefused,
)
from rlhfspec_workers.generation.kv_intake import accept, fetch
from rlhfspec_workers.generation.kv_outbox import KVOutbox
from rlhfspec_workers.messages import KVSnapshot

AUTH = KVAuth(bytes(range(32)), "team-a/tiny-grpo")
KEY = "it2/p7/1#1"
SAMPLE = "it2/p7/1"
BLOCK = 16
LAYOUT = {f"model.layers.{i}.self_attn.attn": ((512, 2, BLOCK, 8), "bfloat16") for i in range(2)}


def _snapshot(**changes: object) -> KVSnapshot:
    fields: dict[str, object] = {
        "sample_id": SAMPLE,
        "token_ids": list(range(20)),  # 20 tokens -> 2 blocks of 16
        "block_size": BLOCK,
        "dtype": "bfloat16",
        "layer_names": sorted(LAYOUT),
        "block_shape": [2, BLOCK, 8],
    }
    fields |= changes
    blocks = -(-len(fields["token_ids"]) // fields["block_size"])  # type: ignore[arg-type, operator]
    size = {"float32": 4}.get(str(fields["dtype"]), 2)
    count = len(fields["layer_names"]) * blocks * 2 * BLOCK * 8 * size  # type: ignore[arg-type]
    data = bytes(i % 251 for i in range(count))
    return KVSnapshot.model_validate(fields).model_copy(update={"data": data})


def _sealed(snapshot: KVSnapshot, key: str = KEY, auth: KVAuth = AUTH) -> bytes:
    frame = snapshot.to_bytes()
    return frame + auth.seal(key, frame)


def _reason(sealed: bytes, *, key: str = KEY, layout: object = LAYOUT, block: int = BLOCK) -> str:
    with pytest.raises(KVRefused) as refused:
        accept(sealed, key, SAMPLE, AUTH, layout, block)  # type: ignore[arg-type]
    return refused.value.reason


def test_a_sealed_snapshot_of_this_sample_and_engine_is_accepted() -> None:
    snapshot = _snapshot()
    sealed = _sealed(snapshot)
    assert len(sealed) == len(snapshot.to_bytes()) + TAG_BYTES == len(snapshot.to_bytes()) + 32
    assert accept(sealed, KEY, SAMPLE, AUTH, LAYOUT, BLOCK) == snapshot


def test_a_zeroed_tampered_truncated_or_foreign_frame_is_unauthentic() -> None:
    snapshot = _snapshot()
    frame = snapshot.to_bytes()
    sealed = _sealed(snapshot)
    header = frame[: len(frame) - len(snapshot.data)]
    zeroed = header + bytes(len(snapshot.data)) + sealed[-TAG_BYTES:]
    assert _reason(zeroed) == "unauthentic"  # a zeroed snapshot loads and changes the output
    for position in (0, 9, len(header) - 1, len(header), len(frame) - 1, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[position] ^= 0x01
        assert _reason(bytes(flipped)) == "unauthentic", position
    assert _reason(sealed[:-1]) == "unauthentic"
    assert _reason(sealed[:TAG_BYTES]) == "unauthentic"
    assert _reason(frame) == "unauthentic"  # an unsealed frame (an older source)
    assert _reason(_sealed(snapshot, auth=KVAuth(b"x" * 32, "team-a/tiny-grpo"))) == "unauthentic"
    assert _reason(_sealed(snapshot, auth=KVAuth(bytes(range(32)), "team-b/tiny-grpo"))) == (
        "unauthentic"  # the same key bytes in another job
    )
    # A genuine seal for another snapshot of the job does not carry over.
    assert _reason(_sealed(snapshot, key="it2/p7/1#2")) == "unauthentic"


def test_a_genuine_snapshot_that_does_not_fit_is_refused_with_its_reason() -> None:
    assert _reason(_sealed(_snapshot(sample_id="it2/p7/0"))) == "wrong_sample"
    assert _reason(_sealed(_snapshot(block_size=32, block_shape=[2, 32, 8]))) == "block_size"
    assert _reason(_sealed(_snapshot()), block=32) == "block_size"
    assert _reason(_sealed(_snapshot(layer_names=["model.layers.0.self_attn.attn"]))) == "layout"
    assert _reason(_sealed(_snapshot(layer_names=[*sorted(LAYOUT), "x"]))) == "layout"
    twice = [sorted(LAYOUT)[0]] * 2
    assert _reason(_sealed(_snapshot(layer_names=twice))) == "layout"
    assert _reason(_sealed(_snapshot(block_shape=[2, BLOCK, 4]))) == "layout"
    assert _reason(_sealed(_snapshot(dtype="float32"))) == "dtype"
    assert _reason(_sealed(_snapshot(dtype="float16"))) == "dtype"
    short = _snapshot()
    short = short.model_copy(update={"data": short.data[:-2]})
    assert _reason(_sealed(short)) == "malformed"  # sealed by the job, yet inconsistent
    not_a_frame = b'{"kind":"kv_snapshot"}'
    assert _reason(not_a_frame + AUTH.seal(KEY, not_a_frame)) == "malformed"


def test_pull_tokens_are_per_job_per_snapshot_and_short_lived() -> None:
    now = time.time()
    token = AUTH.pull_token(KEY, now=now)
    assert AUTH.check_pull_token(KEY, token, now=now) == ""
    assert AUTH.check_pull_token(KEY, token, now=now + PULL_TOKEN_WINDOW - 1) == ""
    assert "off this node's clock" in AUTH.check_pull_token(KEY, token, now=now + 1000)
    assert "off this node's clock" in AUTH.check_pull_token(KEY, token, now=now - 1000)
    assert AUTH.check_pull_token("it2/p7/1#2", token, now=now) == "pull token mismatch"
    other_job = KVAuth(bytes(range(32)), "team-b/tiny-grpo")
    assert other_job.check_pull_token(KEY, token, now=now) == "pull token mismatch"
    stamp, _, digest = token.partition(".")
    # A seal is no token (purposes are separated inside the HMAC).
    forged = f"{stamp}.{AUTH.seal(KEY, stamp.encode()).hex()}"
    assert AUTH.check_pull_token(KEY, forged, now=now) == "pull token mismatch"
    assert AUTH.check_pull_token(KEY, f"{int(stamp) + 1}.{digest}", now=now) != ""
    for bad in (None, "", ".", "abc", f"{stamp}", f"²{stamp[1:]}.{digest}", f"-1.{digest}"):
        assert AUTH.check_pull_token(KEY, bad, now=now) != "", bad


def test_a_key_is_long_and_never_printed() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KVAuth(b"short", "team-a/j")
    assert repr(AUTH) == "KVAuth(job='team-a/tiny-grpo')"


@pytest.fixture()
def outbox() -> Iterator[KVOutbox]:
    box = KVOutbox("127.0.0.1", auth=AUTH)
    yield box
    box.close()


def test_every_way_a_pull_fails_is_a_named_fallback(outbox: KVOutbox) -> None:
    """From the task's URL to a loadable snapshot: one refusal reason per failure, each the
    one a destination counts (``kv_fallback:<reason>``); only "refused" (the engine's own
    check on submit) needs an engine and is covered in the KV migration integration test."""
    seen: dict[str, str] = {}

    def expect(reason: str, url: str, *, auth: KVAuth | None = AUTH, block: int = BLOCK) -> None:
        with pytest.raises(KVRefused) as refused:
            fetch(url, SAMPLE, auth, LAYOUT, block, timeout=2.0)
        assert refused.value.reason == reason, refused.value
        seen[reason] = refused.value.detail

    good = fetch(outbox.put(KEY, _snapshot().to_bytes()), SAMPLE, AUTH, LAYOUT, BLOCK)
    assert good == _snapshot() and len(outbox) == 0
    expect("bad_url", "file:///etc/passwd")
    expect("no_key", outbox.put(KEY, _snapshot().to_bytes()), auth=None)
    expect("token", outbox.put(KEY, b"x"), auth=KVAuth(b"y" * 32, "team-a/tiny-grpo"))
    expect("expired", outbox.base_url + "it9%2Fp0%2F0%231")
    url = outbox.put(KEY, _snapshot().to_bytes())
    with outbox._lock:  # a snapshot zeroed at rest or in transit, its seal kept
        stamp, frame, seal = outbox._frames[KEY]
        data = len(_snapshot().data)
        outbox._frames[KEY] = (stamp, frame[:-data] + bytes(data), seal)
    expect("unauthentic", url)
    expect("wrong_sample", outbox.put(KEY, _snapshot(sample_id="it2/p7/0").to_bytes()))
    expect("malformed", outbox.put(KEY, b"RSKV\x00\x00\x00\x02{}"))
    expect("block_size", outbox.put(KEY, _snapshot().to_bytes()), block=32)
    expect("layout", outbox.put(KEY, _snapshot(block_shape=[1, BLOCK, 16]).to_bytes()))
    expect("dtype", outbox.put(KEY, _snapshot(dtype="float16").to_bytes()))
    dead = KVOutbox("127.0.0.1", auth=AUTH)
    dead_url = dead.put(KEY, _snapshot().to_bytes())
    dead.close()
    expect("unreachable", dead_url)
    reasons = set(typing.get_args(FallbackReason))
    assert set(seen) == reasons - {"refused"}, sorted(reasons - set(seen))
    assert all(seen.values())  # every reason says what happened


def test_a_worker_reads_the_jobs_key_from_its_environment() -> None:
    from rlhfspec_workers.local.supervisor import local_worker_env
    from rlhfspec_workers.runtime import WorkerEnv, WorkerEnvError

    base = {"RLHFSPEC_JOB": "j", "RLHFSPEC_REDIS_URL": "redis://r/0", "RLHFSPEC_JOB_CONFIG": "/c"}
    assert WorkerEnv.from_environ("generation", base).kv_secret is None
    env = WorkerEnv.from_environ("generation", base | {"RLHFSPEC_KV_SECRET": "f" * 64})
    assert env.kv_secret == "f" * 64 and "f" * 64 not in repr(env)
    with pytest.raises(WorkerEnvError, match="RLHFSPEC_KV_SECRET has 8 characters"):
        WorkerEnv.from_environ("generation", base | {"RLHFSPEC_KV_SECRET": "f" * 8})
    # Local mode: a key of its own for every run.
    runs = [
        local_worker_env(job="j", namespace="default", replicas=2, redis_port=1,
                         redis_password="p", job_config=Path("c"), storage=Path("s"))
        for _ in range(2)
    ]  # fmt: skip
    keys = [run["RLHFSPEC_KV_SECRET"] for run in runs]
    assert keys[0] != keys[1] and all(len(bytes.fromhex(k)) == 32 for k in keys)
