"""The control plane: kopf handlers, pure manifest builders and status computation.

Imported as ``rlhfspec_operator`` (the folder ``operator/`` is a source root, never the
package: the standard library owns the name ``operator``).
"""
