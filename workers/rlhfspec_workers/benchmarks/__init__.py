"""Benchmarks: configurations side by side in one process, interleaved, repeated, as ratios.

Flow: ``rlhfspec bench <name>`` (and the scripts under ``bench/``) call ``cli.main``, which runs
one benchmark module. ``generation``: adaptive speculative decoding against speculation off,
fixed k, vLLM Dynamic SD, a TLT-style bandit and a hindsight oracle on one RLHF generation
batch (``policies`` holds the baselines, ``target`` the bigger embedding target, ``report`` the
table, JSON and PNG). Importing this package imports no engine code.
"""
