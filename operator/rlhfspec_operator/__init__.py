"""The control plane: kopf handlers, pure manifest builders and status computation.

Imported as ``rlhfspec_operator`` (the folder ``operator/`` is a source root, never the
package: the standard library owns the name ``operator``).

The flow, module by module: ``main`` (``rlhfspec operator``) starts kopf with ``handlers``;
the handlers parse the RLHFJob once (``rlhfspec_api.manifest``) and call pure code only:
``builders``/``managed_redis`` (spec -> child manifests, named by ``naming``), ``status``
(pods from ``pods`` + progress from ``progress`` -> phase, conditions, events, pod actions),
``updates`` (which spec changes a running job accepts). I/O lives in ``kube`` (children),
``redis_progress`` (the coordinator's progress) and ``metrics`` (/metrics). ``rbac`` and
``install`` build the operator's own least-privilege install, which the Helm chart mirrors.
"""
