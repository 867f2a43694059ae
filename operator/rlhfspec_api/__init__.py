"""The RLHFJob contract: typed spec and status, CRD generation, manifest validation.

Where it sits: every component starts here. The operator parses an RLHFJob once with
:func:`rlhfspec_api.manifest.parse_rlhfjob` and hands typed sub-configs
(``spec.generation``, ``spec.algorithm`` ...) to builders and workers. The CRD in
``crds/`` is generated from these models, so the schema Kubernetes enforces and the
checks the CLI runs cannot drift apart. Pure: pydantic and yaml only.
"""

API_GROUP = "rlhfspec.io"
API_VERSION = "v1alpha1"
KIND = "RLHFJob"
