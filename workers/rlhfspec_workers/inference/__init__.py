"""The inference stage: rewards, reference log-probs and critic values for each rollout.

``experience.ExperienceMaker`` turns Rollout messages into Experience messages (torch, no
Redis), scoring them with the reward registry of ``rlhfspec_workers.rewards``. Importing the
package imports neither torch nor transformers; its modules do.
"""
