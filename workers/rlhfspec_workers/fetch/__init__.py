"""The fetch step: download a job's ``hf://``, ``https://`` and ``s3://`` models and datasets
into its storage before any worker reads them.

Where it sits: between the operator, which gives every worker pod of a job with remote
locations an init container running ``rlhfspec worker fetch`` (``rlhfspec_operator.
fetch_init``), and worker preflight, which then resolves each remote URI to its fetched copy
(``store.resolved_path``) and checks it like any local model. Modules: ``store`` (the path a
URI is fetched to, and the atomic install), ``hf`` (``huggingface_hub``), ``https`` (a file or
an archive), ``s3`` (SigV4 over plain HTTP: AWS or any S3-compatible store, GCS included),
``cli`` (the command). ``gs://`` is refused at validate time: the worker image has no GCS
client, and GCS is reached as an S3-compatible endpoint instead.

Why an init container on each worker pod rather than one fetch Job per job: every worker's
preflight reads every model and the dataset, so every pod needs them before it starts, and
the kubelet already orders an init container before the worker and reruns it in a recreated
pod; a separate Job would add a phase to the operator's state machine, a Job child, RBAC for
it, and a second place a download can fail. The cost is that several pods may fetch the same
URI at once on the job's first start; ``store.install`` makes that harmless (a lock beside the
download, a hidden partial directory renamed into place, first finisher wins, the others
reuse its copy), and every later pod or job finds the copy and makes no request.
"""

from rlhfspec_workers.fetch.store import (
    FetchError,
    RemoteLocation,
    is_remote,
    parse_remote,
    resolved_path,
)

__all__ = ["FetchError", "RemoteLocation", "is_remote", "parse_remote", "resolved_path"]
