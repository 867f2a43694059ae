"""``rlhfspec render FILE [--namespace NS]``: the objects the operator would create, as YAML.

Where it sits: ``main`` dispatches the ``render`` sub-command here. Like ``helm template`` it
needs no cluster: each RLHFJob document of the file goes through the same ``load_documents``
+ ``parse_rlhfjob`` as ``rlhfspec validate`` and the same cluster checks as the operator's
create handler (``admission.spec_errors``), then through the operator's own list of children
(``rlhfspec_operator.plan.creation_plan``, the function the create handler calls). So what is
printed is what the operator creates for a new job, not a copy that could drift: ConfigMap,
Secrets, managed Redis, Services, claim, NetworkPolicies, worker pods.

What cannot be known offline is filled in openly:

* owner references carry :data:`PLACEHOLDER_UID` (the API server assigns the job's uid when
  it is created; children name it so the garbage collector deletes them with the job);
* Secret values (the managed Redis password, the job's KV key) are drawn here with the same
  generators; the operator draws its own at create time, so they are never the values a job
  will use;
* the ConfigMap's copy of the job carries the manifest's own labels and annotations; the
  operator's copy also has those that tools add to the stored job (kubectl's
  last-applied-configuration, the operator's bookkeeping);
* the cluster's admission policy (allowed images, Redis hosts) is the operator's flags, not
  checked here; ``--operator-namespace`` and ``--metrics-from`` stand in for the operator's
  settings the NetworkPolicies admit.

Output: one YAML document per object (``---`` separated, each preceded by a ``# Source:``
comment), exit 0. A manifest the operator would refuse prints the same
``file: field.path: what is wrong (what is allowed)`` lines as ``rlhfspec validate`` to
stderr and exits 1; nothing is printed to stdout for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from rlhfspec_api.manifest import (
    Document,
    DocumentError,
    ManifestError,
    RLHFJob,
    load_documents,
    parse_rlhfjob,
)
from rlhfspec_operator import admission, managed_redis
from rlhfspec_operator.config import parse_peers
from rlhfspec_operator.naming import Owner
from rlhfspec_operator.plan import creation_plan

PLACEHOLDER_UID = "00000000-0000-4000-8000-000000000000"
"""The owner uid in rendered children: a valid RFC 4122 UUID that no API server assigns in
practice (all zeroes but the version and variant bits), so a rendered object is recognisable
as rendered and never mistaken for a live job's child."""
DEFAULT_NAMESPACE = "default"

HELP = (
    "print, as a multi-document YAML stream, every object the operator creates for each "
    "RLHFJob in FILE (like `helm template`). Owner references carry the placeholder uid "
    f"{PLACEHOLDER_UID} (the API server assigns the real one); Secret values (the managed "
    "Redis password, the KV key) are generated here and again by the operator at create time, "
    "so the printed ones are never used. An invalid manifest prints the errors `rlhfspec "
    "validate` prints and exits 1."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a manifest with one or more RLHFJobs")
    parser.add_argument(
        "-n",
        "--namespace",
        help="the job's namespace (default: its metadata.namespace, else 'default')",
    )
    parser.add_argument(
        "--operator-namespace",
        help="where the operator runs (the managed Redis NetworkPolicy admits its pods); "
        "default: none, as for an operator without POD_NAMESPACE",
    )
    parser.add_argument(
        "--metrics-from",
        default="",
        help="JSON list of NetworkPolicy peers admitted to the workers' metrics port, as the "
        "operator's --metrics-from (default: none)",
    )


def _with_namespace(content: object, namespace: str | None) -> object:
    """The document with ``metadata.namespace`` set, so the parser checks the name as it
    checks any namespace (a bad one is an error naming metadata.namespace)."""
    if namespace is None or not isinstance(content, Mapping):
        return content
    meta = content.get("metadata")
    if not isinstance(meta, Mapping):
        return content  # the parser reports the missing metadata
    return {**content, "metadata": {**meta, "namespace": namespace}}


def _job(document: Document, namespace: str | None) -> RLHFJob:
    """Parse and admit one document as the operator would; ManifestError lists the problems."""
    job = parse_rlhfjob(_with_namespace(document.content, namespace))
    problems = admission.spec_errors(job)
    if problems:
        raise ManifestError(problems)
    if not job.namespace:
        job = RLHFJob(job.name, DEFAULT_NAMESPACE, job.spec, job.metadata)
    return job


def render_job(
    job: RLHFJob, *, operator_namespace: str | None, metrics_from: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The children of a new ``job``, as the create handler builds them."""
    owner = Owner(name=job.name, namespace=job.namespace, uid=PLACEHOLDER_UID)
    password = managed_redis.new_password() if managed_redis.managed(job) else ""
    return creation_plan(
        job,
        owner,
        password=password,
        operator_namespace=operator_namespace,
        metrics_from=metrics_from,
        with_pods=not job.spec.suspend,
    )


def _write(objects: Sequence[dict[str, Any]], source: str, out: TextIO) -> None:
    for obj in objects:
        out.write("---\n")
        out.write(f"# Source: {source}: {obj['kind']} {obj['metadata']['name']}\n")
        out.write(yaml.safe_dump(obj, sort_keys=False, width=100))


def render_file(
    name: str,
    out: TextIO,
    err: TextIO,
    *,
    namespace: str | None = None,
    operator_namespace: str | None = None,
    metrics_from: Sequence[dict[str, Any]] = (),
) -> int:
    """Render every RLHFJob of file ``name``; 0 when all rendered, 1 when any was refused (then
    nothing is written to ``out``: a partial stream piped to ``kubectl`` would mislead)."""
    try:
        documents = load_documents(Path(name))
    except DocumentError as exc:
        print(exc, file=err)
        return 1
    if not documents:
        print(f"{name}: no YAML documents", file=err)
        return 1
    rendered: list[tuple[str, list[dict[str, Any]]]] = []
    failed = False
    for document in documents:
        try:
            job = _job(document, namespace)
        except ManifestError as exc:
            failed = True
            for error in exc.errors:
                print(f"{document.label}: {error}", file=err)
            continue
        objects = render_job(job, operator_namespace=operator_namespace, metrics_from=metrics_from)
        rendered.append((f"{document.label} (RLHFJob {job.namespace}/{job.name})", objects))
    if failed:
        print(
            f"{name}: not rendered: the operator would refuse it (fix the errors above)", file=err
        )
        return 1
    for source, objects in rendered:
        _write(objects, source, out)
    return 0


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        metrics_from = parse_peers(args.metrics_from)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        print(f"--metrics-from: {exc} (a JSON list of NetworkPolicy peer objects)", file=err)
        return 2
    return render_file(
        args.file,
        out,
        err,
        namespace=args.namespace,
        operator_namespace=args.operator_namespace,
        metrics_from=metrics_from,
    )
