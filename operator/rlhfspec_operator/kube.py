"""A minimal async Kubernetes client for the children: create (409 is success), get, patch, delete.

Where it sits: the handlers call it to create the manifests the pure builders return and to
delete pods the status logic names. kopf has no public client for arbitrary objects, and the
official client is a heavy dependency of the slim operator image; this one reuses kopf's login
(``handlers.login`` stores the :class:`kopf.ConnectionInfo` here), so the operator has exactly
one way of authenticating. Only the handful of kinds the operator creates are mapped.
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
        """Create ``obj``; False when it already exists (a retry or a resumed operator)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            await self.request("POST", path, obj)
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

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
