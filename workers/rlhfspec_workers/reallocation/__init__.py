"""Sample reallocation: the pure decision logic that keeps every generation worker useful.

The flow, inside the coordinator, every few seconds and whenever a worker runs dry:

1. Load reports -> `WorkerLoad`s (`model`): each worker's samples with tokens generated so far,
   its free slots; the calibrated `CostModel` plus the selector's per-batch-size strategy (or
   a measured step table) -> a `ThroughputModel` (seconds per step and emitted tokens per
   sequence per step, by B); `MigrationCost` prices recompute and KV transfer.
2. `LengthPredictor` (`predictor`): remaining tokens of each running sample, E[L - g | L > g]
   and quantile bands from earlier iterations' lengths and finished siblings of the same
   prompt group; `profile` turns a worker's samples into its predicted drain time.
3. `plan_migrations` (`planner`): greedy moves (bundles, scattered over idle peers) from the
   worker predicted to finish last, only when the predicted gain beats the move's cost and
   within an overhead budget; the cheaper mode per sample under `mode="auto"`; `to_orders`
   groups moves into `MigrationOrder`s. `threshold_plan` (`threshold`) is the RLHFuse-style
   baseline.
4. `workload` + `simulator`: replay static partition, threshold migration and the planner on
   a fluid model of many workers, for benchmarks at scales this machine cannot host.

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
    speculative_speed,
    speed_of,
)
from .planner import PlannerConfig, plan_migrations, predicted_makespan, to_orders
from .predictor import LengthPredictor
from .profile import RemainingProfile, drain_seconds
from .threshold import threshold_plan

__all__ = [
    "LengthPredictor",
    "Migration",
    "MigrationCost",
    "MigrationMode",
    "ModePolicy",
    "PlannerConfig",
    "RemainingProfile",
    "RunningSample",
    "ThroughputModel",
    "WorkerLoad",
    "drain_seconds",
    "plan_migrations",
    "predicted_makespan",
    "speculative_speed",
    "speed_of",
    "threshold_plan",
    "to_orders",
]
