"""Goals handed to goal-conditioned gymnasium environments through ``reset(options={"goal": (x, y)})``."""

from __future__ import annotations

from typing import Any

import numpy as np


def requested_goal(options: dict[str, Any] | None) -> np.ndarray | None:
    """The goal in ``options["goal"]`` as a float64 (x, y) array, or None when none is requested."""
    goal = (options or {}).get("goal")
    if goal is None:
        return None
    goal = np.asarray(goal, dtype=np.float64)
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"options['goal'] must be two finite numbers (x, y), got {goal!r}")
    return goal
