"""A Kubernetes API emulator for the operator tests: KMock plus the server-side behaviour it lacks.

Where it sits: the "cluster" of ``tests/operator``. ``kubectl`` and the operator (a real
``rlhfspec operator`` subprocess) talk HTTP to it on localhost. KMock 0.8 stores objects, serves
discovery, list, watch, get, create, merge/JSON patch and finalizer-aware delete.
This subclass fills what a kube-apiserver adds and the tests rely on:

* metadata: ``uid``, ``resourceVersion``, ``creationTimestamp``, ``generation`` (bumped when
  ``spec`` changes), ``name`` from ``generateName``, ``namespace`` from the URL;
* ``kind``/``apiVersion`` on lists, label and field selectors on lists and watches;
* CRD -> resource registration (``kubectl apply -f crds/``), ``status.phase: Pending`` on new pods;
* garbage collection of dependents whose owners are all gone (``ownerReferences``);
* server-side tables for ``kubectl get``, with a CRD's ``additionalPrinterColumns``;
* a CRD's ``scale`` subresource, for ``kubectl scale`` (``emulator_scale``).

It runs in a thread with its own event loop so that synchronous tests can drive it with kubectl.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import itertools
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp.web
import kmock
from emulator_scale import ScaleSubresource
from kmock._internal import dicts as kmock_dicts  # the emulator's own merge, to predict patches

_CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dig(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _selector_matches(labels: Mapping[str, str], selector: str) -> bool:
    """Equality (``a=b``, ``a==b``, ``a!=b``) and existence (``a``, ``!a``) label selectors."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _fields_match(obj: Mapping[str, Any], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = _dig(obj, key)
        equal = ("" if actual is None else str(actual)) == value
        if equal == negate:
            return False
    return True


class Emulator(ScaleSubresource, kmock.KubernetesEmulator):  # type: ignore[misc]
    """KMock's KubernetesEmulator with apiserver metadata, selectors, CRDs, GC and tables."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # KMock's own importlib.resources deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        self._versions = itertools.count(1)
        self._printer_columns: dict[kmock.resource, list[dict[str, Any]]] = {}
        self.creations: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """(path of the collection, namespace, name) -> how many times it was created."""
        self.request_log: list[tuple[str, str, str, str]] = []
        """(method, path, "watch" or "", User-Agent) of every request served."""

    # --- writes ------------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.is_scale(request):  # KMock has no scale subresource (emulator_scale)
            self._record(request)
            return await self.serve_scale(request)
        resource = request.resource
        if resource is not None and isinstance(request.data, dict):
            if request.action == kmock.action.CREATE:
                self._on_create(request, resource)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._on_patch(request, resource)
        elif resource is not None and request.action == kmock.action.UPDATE:
            self._on_json_patch(request, resource)
        self._record(request)
        try:
            response = await super()._handle(request)
        finally:
            self._forget(request)
        if request.action in (kmock.action.DELETE, kmock.action.UPDATE):
            await self._collect_garbage()
        return response  # type: ignore[no-any-return]

    def _record(self, request: kmock.Request) -> None:
        self.request_log.append(
            (
                str(request.method.value if request.method else ""),
                request.url.path,
                "watch" if request.params.get("watch") == "true" else "",
                request.headers.get("User-Agent", ""),
            )
        )

    def _forget(self, request: kmock.Request) -> None:
        """Drop a handled request from KMock's request log (``request_log`` keeps a record).

        KMock matches each new request against its reactions by scanning the whole log
        (``request in view``), so a session of thousands of requests goes quadratic (0.2 s per
        request after a few minutes). Nothing here asserts on KMock's log.
        """
        for index, logged in enumerate(self._requests):
            if logged is request:
                del self._requests[index]
                break

    def _on_create(self, request: kmock.Request, resource: kmock.resource) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        key = (resource, request.namespace or meta.get("namespace"), meta.get("name"))
        existing = self.objects._objects.get(key)  # a live object: KMock answers 409 itself
        if existing is not None and not existing.deleted:
            return
        self.creations[(request.url.path, str(key[1]), str(key[2]))] += 1
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if resource == kmock.resource("", "v1", "pods"):
            data.setdefault("status", {}).setdefault("phase", "Pending")
        if resource == _CRDS:
            self._register_crd(data)

    def _on_patch(self, request: kmock.Request, resource: kmock.resource) -> None:
        key = (resource, request.namespace, request.name)
        current = self.objects._objects.get(key)
        if current is None or current.deleted:
            return
        patch: dict[str, Any] = request.data
        after = kmock_dicts.patch_dict(copy.deepcopy(current.raw), patch)
        meta_patch = patch.setdefault("metadata", {}) if isinstance(patch, dict) else {}
        # Immutable identity: a client's patch never changes it.
        for field in ("uid", "creationTimestamp", "name", "namespace"):
            meta_patch.pop(field, None)
        meta_patch["resourceVersion"] = str(next(self._versions))
        if request.subresource is None and after.get("spec") != current.raw.get("spec"):
            meta_patch["generation"] = int(current.raw["metadata"].get("generation", 1)) + 1

    def _on_json_patch(self, request: kmock.Request, resource: kmock.resource) -> None:
        if isinstance(request.data, list):
            request.data.append(
                {
                    "op": "add",
                    "path": "/metadata/resourceVersion",
                    "value": str(next(self._versions)),
                }
            )

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names.get("kind"),
                singular=names.get("singular"),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames", [])),
                subresources=set(version.get("subresources", {})),
            )
            self._printer_columns[res] = version.get("additionalPrinterColumns", [])
            self.register_scale(res, version)

    async def _collect_garbage(self) -> None:
        """Delete dependents all of whose owners are gone (the garbage collector's job)."""
        while True:
            live = {
                obj.raw["metadata"].get("uid") for obj in self.objects.values() if not obj.deleted
            }
            orphans = [
                (key, obj)
                for key, obj in self.objects.items()
                if not obj.deleted
                and obj.raw["metadata"].get("ownerReferences")
                and not any(o.get("uid") in live for o in obj.raw["metadata"]["ownerReferences"])
            ]
            if not orphans:
                return
            for (resource, _, _), obj in orphans:
                async with self._lock:
                    if obj.raw["metadata"].get("finalizers"):
                        if not obj.raw["metadata"].get("deletionTimestamp"):
                            obj.patch({"metadata": {"deletionTimestamp": _now()}})
                            event = {"type": "MODIFIED", "object": obj.raw}
                            await self._buses[resource].put(event)
                        continue
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if all(o.raw["metadata"].get("finalizers") for _, o in orphans if not o.deleted):
                return

    # --- reads -------------------------------------------------------------------------------

    async def _serve_version(self, request: kmock.Request) -> Any:
        # KMock repeats short names on subresources ("rlhfjobs/status"); kubectl then warns
        # that a short name is ambiguous. The apiserver lists short names on the main resource.
        # KMock also answers singularName = plural when the bundle has none (core/v1), so
        # `kubectl get configmap` fails; the apiserver's singular is the lower-case kind.
        # And the core group's groupVersion is "v1", not KMock's "/v1" (kubectl then drops
        # the whole core group: "the server doesn't have a resource type configmap").
        payload = await super()._serve_version(request)
        payload["groupVersion"] = str(payload.get("groupVersion", "")).lstrip("/")
        for entry in payload.get("resources", []):
            if "/" in entry["name"]:
                entry["shortNames"] = []
            elif entry.get("singularName") in (None, "", entry["name"]):
                entry["singularName"] = str(entry["kind"]).lower()
        return payload

    def _kind_of(self, resource: kmock.resource) -> str:
        info = self.resources[resource]
        return info.kind or (resource.plural or "").capitalize()

    def _visible(self, request: kmock.Request, obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        label_selector = request.params.get("labelSelector", "")
        field_selector = request.params.get("fieldSelector", "")
        return _selector_matches(labels, label_selector) and _fields_match(obj, field_selector)

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        resource = request.resource
        assert resource is not None
        items = [obj for obj in payload["items"] if self._visible(request, obj)]
        group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        kind = self._kind_of(resource)
        listing = {
            "apiVersion": group_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": [self._with_kind(resource, item) for item in items],
        }
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(resource, listing["items"])
        return listing

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = await super()._serve_fetch(request)
        assert request.resource is not None
        obj = self._with_kind(request.resource, obj)
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(request.resource, [obj])
        return obj

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and isinstance(event.get("object"), dict):
                if not self._visible(request, event["object"]):
                    continue
                assert request.resource is not None
                event = {**event, "object": self._with_kind(request.resource, event["object"])}
            yield event

    def _with_kind(self, resource: kmock.resource, obj: Mapping[str, Any]) -> dict[str, Any]:
        group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        return {"apiVersion": group_version, "kind": self._kind_of(resource), **obj}

    def _table(self, resource: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A meta.k8s.io Table: name, the CRD's printer columns (jsonPath = a dotted path)."""
        columns = [{"name": "Name", "type": "string", "format": "name"}]
        extra = self._printer_columns.get(resource)
        if extra is None:  # built-in kinds: name, a phase if there is one, age
            extra = [
                {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ]
        # priority as the apiserver sends it: kubectl hides priority > 0 columns without -o wide.
        columns += [
            {"name": c["name"], "type": c["type"], "priority": c.get("priority", 0)} for c in extra
        ]
        rows = []
        for item in items:
            cells: list[Any] = [item["metadata"]["name"]]
            for column in extra:
                value = _dig(item, column["jsonPath"])
                if column["type"] == "date" and value:
                    created = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
                    age = datetime.datetime.now(datetime.UTC) - created
                    value = f"{int(age.total_seconds())}s"
                cells.append("<none>" if value is None else value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadata",
                        "metadata": item["metadata"],
                    },
                }
            )
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "columnDefinitions": columns,
            "rows": rows,
        }

    # --- test helpers ------------------------------------------------------------------------

    def live(self, plural: str, namespace: str) -> dict[str, dict[str, Any]]:
        """Live objects of one resource (``'v1/pods'``, ``'apps/v1/deployments'``) by name."""
        res = kmock.resource(plural)
        return {
            name: copy.deepcopy(obj.raw)
            for (resource, ns, name), obj in list(self.objects.items())
            if resource == res and ns == namespace and not obj.deleted
        }


class EmulatorThread:
    """Runs an :class:`Emulator` on 127.0.0.1 (a free port) in a background event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator: Emulator | None = None
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Callable[[Emulator], Any]) -> Any:
        """Run ``fn(emulator)`` on the emulator's loop (objects are not thread-safe)."""
        assert self.emulator is not None

        async def run() -> Any:
            assert self.emulator is not None
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


@contextlib.contextmanager
def running_emulator() -> Iterator[EmulatorThread]:
    thread = EmulatorThread().start()
    try:
        yield thread
    finally:
        thread.stop()
