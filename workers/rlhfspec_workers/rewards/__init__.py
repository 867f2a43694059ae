"""Rewards of the inference stage: one module per reward, behind a registry.

Flow: ``registry.build_reward`` turns the job's reward terms (``RLHFJobSpec.reward_terms``:
``spec.reward``, or the weighted ``spec.rewards``) into one :class:`RewardFunction` that
``inference.experience.ExperienceMaker`` calls on each batch of rollouts. The rules
(``math_answer``, ``exact_match``, ``regex``, ``sort_digits``, ``final_number``) are pure
functions of strings; ``function`` imports and calls a user's callable (preflight imports it
first); ``model`` runs the sequence-classification reward model (the only module that needs
torch, imported only when a job uses it). A reward that cannot score raises
:class:`RewardError` naming the spec field; it never scores 0 silently.
"""

from .base import RewardError, RewardFunction

__all__ = ["RewardError", "RewardFunction"]
