"""A minimal async Kubernetes client for the children: create, get, patch, delete.

Where it sits: the handlers call it to create the manifests the pure builders return and to
delete pods the status logic names. A child that already exists counts as created only when
its controller owner reference is the job's (a retry, a resumed operator): an object someone
else put under the child's name is never adopted (:class:`ChildConflict`), and one left by an
earlier job of the same name is waited out (:class:`ChildPending`) while the garbage collector
removes it.

kopf has no public client for arbitrary objects, and the official client is a heavy dependency
of the slim operator image; this one reuses kopf's login (``handlers.login`` stores the
:class:`kopf.ConnectionInfo` here), so the operator has exactly one way of authenticating. Only
the handful of kinds the operator creates are mapped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import kopf

logger = logging.getLogger(__name__)

# (apiVersion, kind) -> plural: the kinds the operator creates, and nothing else.
PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("apps/v1", "Deployment"): "deployments",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
USER_AGENT = "rlhfspec-operator"


class ChildConflict(Exception):
    """An object under a child's name that the job does not own: never adopted."""

    def __init__(self, kind: str, namespace: str, name: str, holder: str) -> None:
        super().__init__(
            f"{kind} {namespace}/{name} already exists and is not owned by this RLHFJob "
            f"({holder}); the operator will not adopt it: delete or rename it, then re-create "
            "the job"
        )
        self.kind, self.namespace, self.name = kind, namespace, name


class ChildPending(Exception):
    """A child of an earlier job of the same name (or one being deleted): wait for it to go."""


def _holder(existing: dict[str, Any]) -> str:
    """Who controls ``existing``, for messages."""
    for ref in (existing.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"controlled by {ref.get('kind')} {ref.get('name')} uid {ref.get('uid')}"
    return "no controller"


def ownership(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """``mine``, ``stale`` (an earlier job of the same name, or being deleted: the garbage
    collector removes it) or ``foreign``, comparing ``existing``'s controller reference with the
    one in ``wanted`` (the manifest the builders made)."""
    ours = next(r for r in wanted["metadata"]["ownerReferences"] if r.get("controller"))
    meta = existing.get("metadata") or {}
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if refs and refs[0].get("uid") == ours["uid"]:
        return "mine"
    same_job = bool(refs) and all(
        refs[0].get(key) == ours[key] for key in ("apiVersion", "kind", "name")
    )
    # Being deleted: its name frees up soon, and nothing is adopted while we wait.
    if same_job or meta.get("deletionTimestamp"):
        return "stale"
    return "foreign"


class ApiError(Exception):
    """A non-success answer of the API server, with its code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    """One aiohttp session per login; rebuilt when kopf logs in again (e.g. a rotated token)."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_info: kopf.ConnectionInfo | None = None
        self._lock = asyncio.Lock()

    def set_credentials(self, info: kopf.ConnectionInfo) -> None:
        self._info = info

    async def _get_session(self) -> tuple[aiohttp.ClientSession, str]:
        async with self._lock:
            info = self._info
            if info is None:
                raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=5)
            if self._session is None or self._session_info is not info:
                if self._session is not None:
                    await self._session.close()
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                    headers={**info.as_http_headers(), "User-Agent": USER_AGENT},
                    timeout=REQUEST_TIMEOUT,
                )
                self._session_info = info
            return self._session, info.server.rstrip("/")

    async def close(self) -> None:
        async with self._lock:
            if self._session is not None:
                await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        session, server = await self._get_session()
        headers = {"Content-Type": content_type} if body is not None else {}
        async with session.request(method, server + path, json=body, headers=headers) as resp:
            payload: Any
            try:
                payload = await resp.json(content_type=None)
            except ValueError:
                payload = {"message": await resp.text()}
            if resp.status >= 400:
                message = payload.get("message") if isinstance(payload, dict) else None
                raise ApiError(resp.status, str(message or resp.reason))
            return payload if isinstance(payload, dict) else {}

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when the job already owns it (a retry or a resumed operator).

        Raises :class:`ChildConflict` when an object of that name belongs to anyone else,
        :class:`ChildPending` when it belongs to an earlier job of the same name. Looks first
        (no write when it exists), and again when a create races another (409)."""
        meta = obj["metadata"]
        args = (obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        existing = await self.get(*args)
        if existing is None:
            try:
                await self.request("POST", object_path(*args[:3]), obj)
                return True
            except ApiError as exc:
                if exc.status != 409:
                    raise
            existing = await self.get(*args)
            if existing is None:
                raise ChildPending(f"{obj['kind']} {meta['name']} is being replaced")
        self.check_owned(existing, obj)
        return False

    @staticmethod
    def check_owned(existing: dict[str, Any], wanted: dict[str, Any]) -> None:
        """Raise unless ``existing`` is the child ``wanted`` describes (same controller uid)."""
        state = ownership(existing, wanted)
        kind, meta = wanted["kind"], wanted["metadata"]
        if state == "stale":
            raise ChildPending(
                f"{kind} {meta['namespace']}/{meta['name']} of an earlier job of this name is "
                "still being deleted"
            )
        if state == "foreign":
            raise ChildConflict(kind, meta["namespace"], meta["name"], _holder(existing))

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        path = object_path(api_version, kind, namespace, name)
        return await self.request("PATCH", path, body, "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        path = object_path(api_version, kind, namespace, name)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
