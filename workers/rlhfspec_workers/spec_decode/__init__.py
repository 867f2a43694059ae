"""Adaptive speculative decoding: the pure decision logic (RLHFSpec's drafting-strategy selector).

Everything here is standard library only (no torch, vllm, numpy, redis), so it runs in the
coordinator and in CPU-only unit tests; the code that touches an engine is in ``generation``.
What runs where:

1. Cost model (`cost_model`), in each generation worker. At start-up
   ``generation.calibration_run`` times the grid of `calibration_grid.calibration_plan`
   (~10-20 (B, T) points, T = k + 1 tokens verified per sequence, in `calibration_order`,
   within a time budget) and each drafter's cost (`cost_records`: `CostSample`,
   `DrafterCost`), fits a monotone `CostModel` (cells the budget did not reach are fitted:
   `cost_surface`) and caches it as JSON under a `CostTableKey` (model id + hardware id;
   ``generation.cost_cache``). Real engine steps keep refining it
   (``generation.cost_learner.CostLearner`` -> `CostModel.observe_verify`, per grid cell in
   `cost_online`). `synthetic_cost` samples a roofline formula into a `CostModel`: the
   uncalibrated fallback (``generation.cost_table``), the reallocation simulator and tests.
2. Acceptance (`acceptance`). In the worker, the proposer learns per-position acceptance from
   how many tokens vLLM sampled per request (``generation.proposer``); the drafting strategy
   (``generation.draft_strategy.SelectorStrategy``) folds each step into one `AcceptanceEstimator`
   per drafter as `StepStats` (plus each drafter's fill and side drafts). The worker also sends
   per-(drafter, k) counts as ``messages.AcceptanceReport``s; the coordinator
   (``coordinator.strategy``) folds them into its own estimators, pooled over all workers, and warns
   when a drafter collapses (accepted length ~1.0 after a weight sync). `SpecDecodeCounters`,
   `counters_delta` (vLLM's cumulative counters) and `pool` are used only by tests today; the worker
   merges the coordinator's pooled rates with `AcceptanceEstimator.merge`.
3. Selection (`selector`). Per step in the worker: `AdaptiveSelector` (hysteresis over
   `score_all`, k = 0 included) inside ``generation.draft_strategy.SelectorStrategy``. In the
   coordinator: `selector_table` over `batch_buckets`, broadcast as a versioned
   ``messages.StrategyTable`` that each worker starts from for its batch size. `choose` and
   `SelectorInput` also price a worker's throughput in ``reallocation.model``.
   `oracle_choice`, `hindsight_schedule` and `SelectorTable.to_batch_size_schedule` are used
   only by tests; the benchmarks' hindsight oracle replays steps with `hindsight`.
4. `bandit` is the TLT-style epsilon-greedy baseline over the same strategies, for benchmarks.

A strategy is a `DraftChoice` (drafter, k) everywhere (`draft_choice`: the selector's
`ScoredChoice.strategy`, the bandit's arms, the generation worker's per-step choice); a
`BatchRange` is a batch-size range with its choice (strategy-table rows, schedules).
"""

from .acceptance import (
    AcceptanceEstimator,
    AcceptanceModel,
    BetaPrior,
    FixedAcceptance,
    SpecDecodeCounters,
    StepStats,
    counters_delta,
    pool,
)
from .bandit import BanditSelector, bucket_of, strategy_set
from .calibration_grid import calibration_batches, calibration_plan
from .cost_model import CostModel
from .cost_records import OFF, CostSample, CostTableKey, DrafterCost
from .draft_choice import NO_DRAFT, BatchRange, DraftChoice
from .selector import (
    AdaptiveSelector,
    Candidate,
    ScoredChoice,
    SelectorEntry,
    SelectorInput,
    SelectorTable,
    batch_buckets,
    choose,
    evaluate,
    hindsight_schedule,
    oracle_choice,
    score_all,
    selector_table,
)
from .synthetic_cost import Roofline, drafter_from_roofline, synthetic_cost_model

__all__ = [
    "NO_DRAFT",
    "OFF",
    "AcceptanceEstimator",
    "AcceptanceModel",
    "AdaptiveSelector",
    "BanditSelector",
    "BatchRange",
    "BetaPrior",
    "Candidate",
    "CostModel",
    "CostSample",
    "CostTableKey",
    "DraftChoice",
    "DrafterCost",
    "FixedAcceptance",
    "Roofline",
    "ScoredChoice",
    "SelectorEntry",
    "SelectorInput",
    "SelectorTable",
    "SpecDecodeCounters",
    "StepStats",
    "batch_buckets",
    "bucket_of",
    "calibration_batches",
    "calibration_plan",
    "choose",
    "counters_delta",
    "drafter_from_roofline",
    "evaluate",
    "hindsight_schedule",
    "oracle_choice",
    "pool",
    "score_all",
    "selector_table",
    "strategy_set",
    "synthetic_cost_model",
]
