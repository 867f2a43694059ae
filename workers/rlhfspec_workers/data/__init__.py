"""Datasets: reading a job's prompt rows (``rows``) and making tasks to train on (``arithmetic``).

Where it sits: preflight, the coordinator and ``rlhfspec generate`` read prompts through
``rows`` (one reader, one set of row checks); ``rlhfspec data make`` writes task files.
"""
