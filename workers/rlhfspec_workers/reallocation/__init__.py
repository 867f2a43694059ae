"""Sample reallocation: the pure decision logic that keeps every generation worker useful.

The flow, inside the coordinator, every few seconds and whenever a worker runs dry:

1. Load reports -> `WorkerLoad`s (`model`): each worker's samples with tokens generated so far,
   its free slots; the calibrated `CostModel` plus the selector's per-batch-size strategy ->
   a `ThroughputModel` (seconds per step and emitted tokens per sequence per step, by B).
2. `LengthPredictor` (`predictor`): remaining tokens of each running sample, E[L - g | L > g]
   from earlier iterations' lengths and finished siblings of the same prompt group.
3. `plan_migrations` (`planner`): greedy moves from the worker predicted to finish last to
   earlier ones, only when the predicted gain beats the `MigrationCost` (recompute or KV
   transfer, the cheaper one under `mode="auto"`); `threshold_plan` is the RLHFuse-style
   baseline; `to_orders` groups moves into `MigrationOrder`s.
4. `simulator`: replays static partition, threshold migration and the planner on a fluid model
   of many workers, for benchmarks at scales this machine cannot host.

Standard library only (plus the pydantic message types): no torch, vllm, redis or numpy.
"""

from .model import (
    Migration,
    MigrationCost,
    MigrationMode,
    ModePolicy,
    RunningSample,
    ThroughputModel,
    WorkerLoad,
    drain_seconds,
    speculative_speed,
)
from .planner import (
    PlannerConfig,
    plan_migrations,
    predicted_makespan,
    threshold_plan,
    to_orders,
)
from .predictor import LengthPredictor

__all__ = [
    "LengthPredictor",
    "Migration",
    "MigrationCost",
    "MigrationMode",
    "ModePolicy",
    "PlannerConfig",
    "RunningSample",
    "ThroughputModel",
    "WorkerLoad",
    "drain_seconds",
    "plan_migrations",
    "predicted_makespan",
    "speculative_speed",
    "threshold_plan",
    "to_orders",
]
