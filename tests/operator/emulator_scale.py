"""The ``scale`` subresource of custom resources, as a kube-apiserver serves it, for the emulator.

Where it sits: ``emulator.Emulator`` mixes this in; ``_register_crd`` records each CRD
version's ``subresources.scale`` paths and ``_handle`` sends ``.../<plural>/<name>/scale``
requests here before KMock sees them. KMock alone answers such a request with the object
itself and merges the body into it (``kubectl scale`` then fails: "no kind RLHFJob is
registered"), so this does what the apiserver does:

* ``GET .../scale``: an ``autoscaling/v1`` Scale whose ``spec.replicas`` is read at the CRD's
  ``specReplicasPath``, ``status.replicas`` at ``statusReplicasPath`` (0 when unset) and
  ``status.selector`` at ``labelSelectorPath``;
* ``PATCH``/``PUT .../scale``: the Scale's ``spec.replicas`` written to ``specReplicasPath`` of
  the object, through an ordinary merge patch of the object (so its generation, resource
  version and watch events are the emulator's usual ones), then the new Scale.

What it does not do: the apiserver validates the resulting object against the CRD's schema
(a replica count below the schema's minimum is refused with 422); this emulator stores it,
as it stores any object without a schema check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import aiohttp.web
import kmock


def _path(obj: Mapping[str, Any], json_path: str) -> Any:
    value: Any = obj
    for key in json_path.strip(".").split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _nested(json_path: str, value: Any) -> dict[str, Any]:
    """``{"spec": {"generation": {"replicas": value}}}`` for ``.spec.generation.replicas``."""
    keys = json_path.strip(".").split(".")
    patch: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        patch = {key: patch}
    return patch


class ScaleSubresource:
    """Mixin: ``scale_paths`` is filled from CRDs; :meth:`serve_scale` answers scale requests."""

    scale_paths: dict[kmock.resource, dict[str, str]]

    def register_scale(self, resource: kmock.resource, version: Mapping[str, Any]) -> None:
        if not hasattr(self, "scale_paths"):
            self.scale_paths = {}
        scale = (version.get("subresources") or {}).get("scale")
        if scale:
            self.scale_paths[resource] = dict(scale)

    def is_scale(self, request: kmock.Request) -> bool:
        paths = getattr(self, "scale_paths", {})
        return request.subresource == "scale" and request.resource in paths

    async def serve_scale(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Answer a GET/PATCH/PUT of ``.../<name>/scale`` by reading or patching the object."""
        assert request.resource is not None
        paths = self.scale_paths[request.resource]
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        object_url = origin + request.url.path.removesuffix("/scale")
        method = str(request.method.value if request.method else "GET").upper()
        async with aiohttp.ClientSession() as session:
            if method in ("PATCH", "PUT"):
                replicas = _path(request.data or {}, ".spec.replicas")
                if not isinstance(replicas, int) or isinstance(replicas, bool):
                    return aiohttp.web.json_response(
                        {"kind": "Status", "code": 422, "message": "spec.replicas: an integer"},
                        status=422,
                    )
                patch = _nested(paths["specReplicasPath"], replicas)
                headers = {"Content-Type": "application/merge-patch+json"}
                async with session.patch(object_url, json=patch, headers=headers) as response:
                    if response.status >= 400:
                        return aiohttp.web.json_response(
                            await response.json(content_type=None), status=response.status
                        )
            async with session.get(object_url) as response:
                obj = await response.json(content_type=None)
                if response.status >= 400:
                    return aiohttp.web.json_response(obj, status=response.status)
        meta = obj.get("metadata") or {}
        status: dict[str, Any] = {"replicas": _path(obj, paths["statusReplicasPath"]) or 0}
        selector = paths.get("labelSelectorPath")
        if selector and _path(obj, selector):
            status["selector"] = _path(obj, selector)
        return aiohttp.web.json_response(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {
                    key: meta[key]
                    for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                    if key in meta
                },
                "spec": {"replicas": _path(obj, paths["specReplicasPath"])},
                "status": status,
            }
        )
