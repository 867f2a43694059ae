"""Adaptive speculative decoding: the pure decision logic (RLHFSpec's drafting-strategy selector).

The flow, once per generation worker and then every decode step:

1. Calibration -> cost model (`cost_model`). At start-up a worker times a small grid of engine
   steps (`calibration_grid.calibration_plan`: ~10-20 (B, T) points, T = k + 1 tokens verified
   per sequence, measured in `calibration_order` within a time budget) and the per-token cost
   of each drafter (`cost_records`: `CostSample`, `DrafterCost`), fits a monotone `CostModel`
   (cells the budget did not reach are fitted: `cost_surface`), and caches it as JSON under a
   `CostTableKey` (model id + hardware id) so the next worker on the same model and hardware
   reuses it. Real engine steps keep refining it (`CostModel.observe_verify`, per grid cell in
   `cost_online`). `synthetic_cost` samples a roofline formula into a `CostModel` for tests
   and the simulator.
2. Per-step stats -> acceptance (`acceptance`). vLLM's cumulative spec-decode counters are
   turned into deltas (`counters_delta`) and folded into one `AcceptanceEstimator` per
   drafter: Beta-smoothed, exponentially-forgetting P(position i accepted | i-1 accepted).
   Workers ship estimators to the coordinator, which pools them (`merge` / `pool`) and watches
   for collapse (accepted length ~1.0 after a weight sync).
3. (cost, acceptance, batch size) -> selector -> choice (`selector`). `choose` maximises
   expected emitted tokens per second over drafters x k, k = 0 included; `AdaptiveSelector`
   adds hysteresis for per-step use; `strategy_table` precomputes a versioned per-bucket table
   the coordinator broadcasts and from which vLLM's `num_speculative_tokens_per_batch_size`
   schedule is derived. The choice is applied in vLLM each step by the engine-side code
   (elsewhere: this package never touches an engine).
4. `bandit` is the TLT-style epsilon-greedy baseline over the same strategies, for benchmarks.

Everything here is standard library only (no torch, vllm, numpy, redis), so it runs in the
coordinator and in CPU-only unit tests.
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
from .selector import (
    AdaptiveSelector,
    Candidate,
    Choice,
    SelectorInput,
    StrategyEntry,
    StrategyTable,
    batch_buckets,
    choose,
    evaluate,
    hindsight_schedule,
    oracle_choice,
    score_all,
    strategy_table,
)
from .synthetic_cost import Roofline, drafter_from_roofline, synthetic_cost_model

__all__ = [
    "OFF",
    "AcceptanceEstimator",
    "AcceptanceModel",
    "AdaptiveSelector",
    "BanditSelector",
    "BetaPrior",
    "Candidate",
    "Choice",
    "CostModel",
    "CostSample",
    "CostTableKey",
    "DrafterCost",
    "FixedAcceptance",
    "Roofline",
    "SelectorInput",
    "SpecDecodeCounters",
    "StepStats",
    "StrategyEntry",
    "StrategyTable",
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
    "strategy_set",
    "strategy_table",
    "synthetic_cost_model",
]
