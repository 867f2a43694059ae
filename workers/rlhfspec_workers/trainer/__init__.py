"""The training stage: pure GRPO/PPO math (``core_algos``) and the trainer worker around it."""
