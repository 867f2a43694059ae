"""The inference stage: rewards, reference log-probs and critic values for each rollout.

``experience.ExperienceMaker`` turns Rollout messages into Experience messages (torch, no
Redis); ``rewards`` holds the reward registry. Importing the package imports neither torch nor
transformers; its modules do.
"""
