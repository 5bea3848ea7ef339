"""The registry's rollout defaults, in one place for the registry (services/registry/rollout.py's
RolloutPolicy takes them) and the CLI's help, which must not import the service code."""

from __future__ import annotations

from dataclasses import dataclass

# A rollout started by OptimizeVersion also gates on shadow agreement with production.
OPTIMIZE_MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class RolloutDefaults:
    """Defaults for every field a caller leaves unset (docs/rollouts.md quotes them)."""

    step_weight: int = 10
    interval_seconds: float = 30.0
    max_weight: int = 50
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5  # 0 = gate off
    min_shadow_agreement: float = 0.0  # 0 = gate off
    min_requests: int = 20
    failure_limit: int = 2
