"""The targets beyond the paper: per task family, what a learned loss must beat at the baseline's OWN tuned rate,
and which comparison of which experiment measures each ingredient.

Three ingredients per target, each a column of the results page's table of targets (``ml3 report``):

* **plain ML³**: the paper's recipe, its loss frozen;
* **improved, frozen**: the improvement of the ``beyond_*`` experiment (a longer meta-training horizon, normalised
  torques, ...), its loss frozen;
* **improved, adapting online**: the same loss adapting while each optimizee trains (:mod:`ml3cli.engine.online`).

A cell names a comparison by experiment and label; the report fills it from that experiment's committed
``results.json`` (a target is met when a cell's verdict at tuned rates is "reproduced"), says "not run" while the
experiment has no full run, and refuses a label its results do not hold, so that a renamed comparison cannot
silently empty a cell. Nothing here is a number.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """A comparison of a ``ml3 reproduce`` experiment: its name and the comparison's label."""

    experiment: str
    label: str


@dataclass(frozen=True)
class Target:
    """One row of the table of targets."""

    task: str  #: what the optimizees learn
    beat: str  #: the baseline, at its own tuned rate
    plain: Measured | None  #: the paper's loss, frozen
    frozen: Measured | None  #: the improved loss, frozen
    adapting: Measured | None  #: the improved loss adapting online
    #: show the verdict's reason rather than Δ at tuned rates (a comparison whose verdict is not about Δ: PPO's final
    #: level)
    by_reason: bool = False
    #: a metric shown beside Δ, learned vs baseline at tuned rates (the mean over seeds): a report metric of the
    #: comparison (``accuracy``) or a per-curve value of its ``extra`` (``inertia_error``)
    beside: str | None = None

    def cells(self) -> dict[str, Measured | None]:
        return {"plain ML³": self.plain, "improved, frozen": self.frozen, "improved, adapting online": self.adapting}


TARGETS: tuple[Target, ...] = (
    Target(
        task="`sine_shifted` (paper nets), SGD",
        beat="MSE (SGD)",
        plain=Measured("beyond_sine", "sgd: plain ML³ (sine)"),
        frozen=Measured("beyond_sine", "sgd: horizon (sine_horizon)"),
        adapting=Measured("beyond_sine", "sgd: horizon + online adaptation"),
    ),
    Target(
        task="`sine_shifted` (paper nets), Adam",
        beat="MSE (Adam)",
        plain=Measured("beyond_sine", "adam: plain ML³ (sine)"),
        frozen=Measured("beyond_sine", "adam: horizon (sine_horizon_adam)"),
        adapting=Measured("beyond_sine", "adam: horizon + online adaptation"),
    ),
    Target(
        task="`mnist_binary`, 4 held-out pairs, LeNet, SGD",
        beat="cross-entropy (SGD)",
        plain=Measured("beyond_mnist_binary", "sgd: plain ML³"),
        frozen=None,
        adapting=Measured("beyond_mnist_binary", "sgd: + online adaptation"),
        beside="accuracy",
    ),
    Target(
        task="`mnist_binary`, 4 held-out pairs, LeNet, Adam",
        beat="cross-entropy (Adam)",
        plain=Measured("beyond_mnist_binary", "adam: plain ML³"),
        frozen=None,
        adapting=Measured("beyond_mnist_binary", "adam: + online adaptation"),
        beside="accuracy",
    ),
    Target(
        task="`mnist` (10 classes), LeNet",
        beat="cross-entropy (SGD)",
        plain=Measured("mnist_binary", "10 classes, LeNet"),
        frozen=Measured("beyond_mnist", "sgd: meta-trained on 10 classes (mnist10)"),
        adapting=Measured("beyond_mnist", "sgd: + online adaptation"),
        beside="accuracy",
    ),
    Target(
        task="`inverse_dynamics_sawyer` (with the physics prior)",
        beat="torque MSE (SGD)",
        plain=Measured("inverse_dynamics", "Sawyer: learned with the prior vs torque_mse"),
        frozen=Measured("beyond_sawyer", "Sawyer, normalised: learned with the prior vs torque_mse"),
        adapting=Measured(
            "beyond_sawyer", "Sawyer, normalised + online adaptation: learned with the prior vs torque_mse"
        ),
        beside="inertia_error",
    ),
    Target(
        task="`reacher_goal_mf`",
        beat="PPO (CleanRL's setup): end at or above its final level",
        plain=Measured("mfrl", "ReacherGoal (mfrl_reacher) against PPO"),
        frozen=Measured("beyond_reacher", "ReacherGoal, reward input (mfrl_reacher_reward) against PPO"),
        adapting=Measured(
            "beyond_reacher", "ReacherGoal, reward input + online adaptation (mfrl_reacher_reward) against PPO"
        ),
        by_reason=True,
    ),
)
