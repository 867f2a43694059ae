"""A draft model for any Llama-family policy, distilled from the policy's own rollouts.

Where it sits: ``rlhfspec models distill-draft`` (``cli``) runs the whole recipe; the parts
are pure functions a job can call again later to keep a draft fresh as RL moves the policy.

1. ``layers.draft_from_policy``: a ``num_hidden_layers = L`` copy of the policy whose blocks
   are L of the policy's, evenly spaced (first and last included), and whose embeddings,
   final norm and (tied) head are the policy's own. Same tokenizer, same vocabulary: the
   ``draft_model`` drafter takes it as is.
2. ``rollouts.sample_rollouts``: the policy's own generations (temperature 1, as RL samples)
   over the dataset's prompts, rendered with the chat template when rows are chat messages,
   sampled by a vLLM engine over the policy (``rollouts.policy_sampler``).
3. ``train.distill``: forward KL from the policy's next-token distribution to the draft's on
   the response positions, the frozen teacher's final hidden states computed once (no stored
   vocabularies), its head re-applied per batch.
4. ``acceptance.acceptance_report``: what speculative sampling would accept, per draft
   position, on held-out prompts: alpha_t = sum_x min(p_t(x), q_t(x)) along the policy's
   own trajectories, and P(position i accepted) = mean over t of prod_{j<=i} alpha_{t+j}.
"""
