"""The ``rlhfspec`` command line: one entry point for both planes.

Sub-commands import their plane lazily, so ``rlhfspec crd`` and ``rlhfspec validate``
work in the slim operator image that has no torch or vllm.
"""
