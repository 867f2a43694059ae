"""Children are never adopted, Secrets never read for a job that may not use them (issue #17,
findings 2, 3, 6).

``kube.Kube`` runs against an in-memory API (its ``request`` replaced), so every answer the API
server gives (404, an object someone else owns, a 409 race) is exercised without a cluster.
The progress reader runs against a real redis-server with ``requirepass``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_operator import admission, managed_redis
from rlhfspec_operator.config import OperatorConfig
from rlhfspec_operator.credentials import Credentials, NotUsable
from rlhfspec_operator.kube import ApiError, ChildConflict, ChildPending, Kube, ownership
from rlhfspec_operator.naming import Owner
from rlhfspec_operator.redis_progress import AUTH_FAILED, ProgressReader, RedisTarget
from rlhfspec_workers.local.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
OWNER = Owner("tiny-grpo", "team-a", "11111111-1111-1111-1111-111111111111")
EARLIER = Owner("tiny-grpo", "team-a", "22222222-2222-2222-2222-222222222222")
SERVICE = "/api/v1/namespaces/team-a/services"
SECRETS = "/api/v1/namespaces/team-a/secrets"


def make_job(**spec: Any) -> RLHFJob:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = "team-a"
    doc["spec"].update(spec)
    return parse_rlhfjob(doc)


class MemoryKube(Kube):
    """The API server as a dict of path -> object; ``race`` answers the next POST with 409."""

    def __init__(self, objects: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.objects = dict(objects or {})
        self.calls: list[tuple[str, str]] = []
        self.race: dict[str, Any] | None = None

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = ""
    ) -> dict[str, Any]:
        self.calls.append((method, path))
        if method == "GET":
            if path not in self.objects:
                raise ApiError(404, "not found")
            return copy.deepcopy(self.objects[path])
        assert method == "POST"
        full = f"{path}/{body['metadata']['name']}"
        if self.race is not None:
            self.objects[full], self.race = self.race, None
        if full in self.objects:
            raise ApiError(409, "already exists")
        self.objects[full] = copy.deepcopy(body)
        return dict(body)


def service(owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "tiny-grpo-redis", "namespace": "team-a"}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {}}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- finding 3: ownership before reuse -----------------------------------------------------


def test_ownership_tells_mine_an_earlier_jobs_and_anyone_elses() -> None:
    wanted = service(OWNER)
    assert ownership(service(OWNER), wanted) == "mine"
    assert ownership(service(EARLIER), wanted) == "stale"  # the garbage collector removes it
    assert ownership(service(None), wanted) == "foreign"
    other_job = service(Owner("other-job", "team-a", EARLIER.uid))
    assert ownership(other_job, wanted) == "foreign"
    deleting = service(None)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert ownership(deleting, wanted) == "stale"


def test_create_never_adopts_an_object_someone_else_put_under_the_childs_name() -> None:
    kube = MemoryKube({f"{SERVICE}/tiny-grpo-redis": service(None)})
    with pytest.raises(ChildConflict) as caught:
        run(kube.create(service(OWNER)))
    assert str(caught.value).startswith(
        "Service team-a/tiny-grpo-redis already exists and is not owned by this RLHFJob "
        "(no controller)"
    )
    assert ("POST", SERVICE) not in kube.calls


def test_create_reuses_its_own_child_and_waits_out_an_earlier_jobs() -> None:
    kube = MemoryKube()
    assert run(kube.create(service(OWNER))) is True
    assert run(kube.create(service(OWNER))) is False  # a retry: already there, ours
    kube = MemoryKube({f"{SERVICE}/tiny-grpo-redis": service(EARLIER)})
    with pytest.raises(ChildPending, match="earlier job of this name"):
        run(kube.create(service(OWNER)))


def test_a_create_racing_another_writer_checks_what_won() -> None:
    kube = MemoryKube()
    kube.race = service(None)  # someone creates it between our GET and our POST
    with pytest.raises(ChildConflict):
        run(kube.create(service(OWNER)))
    kube = MemoryKube()
    kube.race = service(OWNER)  # our own earlier attempt
    assert run(kube.create(service(OWNER))) is False


# --- findings 2 and 3: which Secrets the operator reads ---------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def managed_secret(owner: Owner | None, password: str = "planted") -> dict[str, Any]:
    secret = managed_redis.password_secret(make_job(), owner or OWNER, password)
    if owner is None:
        del secret["metadata"]["ownerReferences"]
    return secret


def user_secret(labelled: bool) -> dict[str, Any]:
    labels = {admission.SECRET_OPT_IN_LABEL: "true"} if labelled else {}
    return {"metadata": {"name": "redis-auth", "labels": labels}, "data": {"password": b64("pw")}}


EXTERNAL = {
    "mode": "external",
    "url": "redis://redis.infra.svc:6379/0",
    "passwordSecret": {"name": "redis-auth"},
}


def credentials(objects: dict[str, Any], hosts: list[str] | None = None) -> Credentials:
    config = OperatorConfig(allowed_redis_hosts=hosts or ["*.infra.svc"])
    return Credentials(MemoryKube(objects), config)


def test_a_managed_password_secret_the_job_does_not_own_is_never_read() -> None:
    creds = credentials({f"{SECRETS}/tiny-grpo-redis": managed_secret(None)})
    with pytest.raises(ChildConflict, match="Secret team-a/tiny-grpo-redis"):
        run(creds.managed_password(make_job(), OWNER))
    with pytest.raises(NotUsable, match="not owned by this RLHFJob"):
        run(creds.target(make_job(), OWNER))
    mine = credentials({f"{SECRETS}/tiny-grpo-redis": managed_secret(OWNER, "kept")})
    assert run(mine.managed_password(make_job(), OWNER)) == "kept"  # never rotated
    target = run(mine.target(make_job(), OWNER))
    assert target.password == "kept"
    assert target.password_source == "Secret team-a/tiny-grpo-redis, key password"


def test_an_unlabelled_user_secret_is_never_sent_to_redis() -> None:
    job = make_job(coordinator=EXTERNAL)
    creds = credentials({f"{SECRETS}/redis-auth": user_secret(labelled=False)})
    with pytest.raises(NotUsable, match="does not carry the label"):
        run(creds.target(job, OWNER))
    labelled = credentials({f"{SECRETS}/redis-auth": user_secret(labelled=True)})
    assert run(labelled.target(job, OWNER)) == RedisTarget(
        "redis://redis.infra.svc:6379/0", "pw", "Secret team-a/redis-auth, key password"
    )


def test_a_host_off_the_allow_list_is_refused_before_any_secret_is_read() -> None:
    job = make_job(coordinator={**EXTERNAL, "url": "redis://attacker.example:6379/0"})
    creds = credentials({f"{SECRETS}/redis-auth": user_secret(labelled=True)})
    with pytest.raises(NotUsable, match=r"host 'attacker\.example' is not a Redis host"):
        run(creds.target(job, OWNER))
    assert creds._kube.calls == []  # type: ignore[attr-defined]


# --- finding 6 on the operator's side: a refused password is its own reason -----------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), password="right") as srv:
        yield srv


@pytest.mark.timeout(60)
def test_a_refused_password_names_its_secret_and_is_not_an_outage(server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{server.port}/0"
    source = "Secret team-a/redis-auth, key password"

    async def read(password: str | None) -> Any:
        reader = ProgressReader(timeout=10.0)  # a busy machine
        try:
            return await reader.read(RedisTarget(url, password, source), "team-a", "tiny-grpo")
        finally:
            await reader.close()

    for password in ("wrong", None):
        refused = run(read(password))
        assert refused.error_reason == AUTH_FAILED
        assert refused.error.startswith(f"Redis refused the password from {source}: ")
    ok = run(read("right"))
    assert ok.error is None and ok.attempted


# --- the conditions a refusal leaves -------------------------------------------------------


def test_a_conflict_fails_the_job_with_a_condition_naming_the_object() -> None:
    import datetime

    from rlhfspec_api.status import Phase, RLHFJobStatus
    from rlhfspec_operator import status as state
    from rlhfspec_operator.pods import PodView
    from rlhfspec_operator.progress import ProgressRead

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    message = str(ChildConflict("Pod", "team-a", "tiny-grpo-trainer", "no controller"))
    refused, event = state.validation_failed([message], 1, now, "ChildConflict")
    failed = {c.type: c for c in refused.conditions}["Failed"]
    assert (refused.phase, refused.reason, failed.reason) == (
        Phase.FAILED, "ChildConflict", "ChildConflict"
    )  # fmt: skip
    assert "Pod team-a/tiny-grpo-trainer already exists" in failed.message
    assert (event.type, event.reason) == ("Warning", "ChildConflict")

    running = PodView("tiny-grpo-inference", "tiny-grpo", "inference", 0, phase="Running")
    obs = state.Observation(
        make_job(), 1, RLHFJobStatus(phase=Phase.RUNNING), [running], ProgressRead(), now
    )
    plan = state.fail(obs, "ChildConflict", message)
    assert plan.status.phase is Phase.FAILED and plan.status.message == message
    assert plan.delete == ["tiny-grpo-inference"]  # a failed job holds no accelerators
