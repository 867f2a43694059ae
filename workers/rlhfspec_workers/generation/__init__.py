"""Generation: the rollout engine of a generation worker.

Flow: ``engine.GenerationEngine`` wraps one in-process vLLM engine; with speculative decoding
on, vLLM's ``custom_class`` proposer is ``proposer.AdaptiveProposer``, which every step asks a
``draft_strategy.DraftStrategy`` for (drafter, k) and drafts with ``rlhfspec_workers.drafters``.
Importing this package is cheap; ``engine`` imports vLLM.
"""
