"""Beyond the paper, Sawyer inverse dynamics: with the torques normalised per joint, does a learned loss train the
Sawyer's Deep-Lagrangian models better than torque MSE at torque MSE's OWN tuned rate, and does online adaptation
add to it?

The paper's recipes (:mod:`~ml3cli.experiments.inverse_dynamics`) feed the loss torques in N·m. The Sawyer's joints
span two orders of magnitude (the std of right_j1 is 25.8 N·m, of the wrist 0.19 N·m), and one M_φ, shared by every
joint, sees them all; at tuned rates those losses lose to torque MSE. Here the recipes
``inverse_dynamics_sawyer_normalized`` (with the physics prior) and ``inverse_dynamics_sawyer_normalized_noprior``
set ``normalize_torques: true``: M_φ sees û_j/s_j and u_j/s_j, s_j the std of joint j's meta-train torques
(recorded in the artifact). Torque MSE, the baseline and the metric, stays in N·m.

Rows (:func:`~ml3cli.experiments.physics_prior.compare_robot`: 3 meta-train seeds per recipe, every loss at its
own rate chosen on validation trajectories, 4 test tasks × 5 test seeds, 1000 SGD steps, torque MSE on held-out
trajectories), each as three comparisons (with the prior vs torque MSE, without it vs torque MSE, with vs without):

* **normalised**: the learned losses frozen;
* **normalised + online adaptation**: the same losses adapting while each model trains (:mod:`ml3cli.engine.online`:
  every 10 steps, one Adam step on φ, η = 1e-3, by the meta-gradient of the torque MSE on the task's training
  samples through the last step), tuned with adaptation on as they are tested.

The plain ML³ row (no normalisation) is the ``inverse_dynamics`` experiment's Sawyer row. The experiment is
reproduced when a loss learned with the prior beats torque MSE at tuned rates.
"""

from __future__ import annotations

from typing import Any

from ml3cli.engine.online import Adaptation
from ml3cli.experiments.physics_prior import compare_robot
from ml3cli.experiments.protocol import Context, Experiment

#: (recipe with the physics prior, the same recipe without it), both with normalised torques
RECIPES = ("inverse_dynamics_sawyer_normalized", "inverse_dynamics_sawyer_normalized_noprior")
#: online adaptation as the rows use it: a one-step look-ahead every 10 optimizee steps
ADAPTATION = Adaptation(every=10, lr=1e-3, unroll=1)


def run(context: Context) -> list[dict[str, Any]]:
    """Three comparisons frozen, three adapting online."""
    return [
        *compare_robot(context, "Sawyer, normalised", *RECIPES),
        *compare_robot(context, "Sawyer, normalised + online adaptation", *RECIPES, adaptation=ADAPTATION),
    ]


EXPERIMENT = Experiment(
    name="beyond_sawyer",
    paper="beyond the paper",
    claim=(
        "with torques normalised per joint, a loss learned with the physics prior trains Sawyer inverse-dynamics "
        "models better than torque MSE at torque MSE's own tuned rate"
    ),
    recipes=RECIPES,
    run=run,
    meta_seeds=3,
    quick=("outer.steps=20", "meta_test.steps=100"),
    quick_eval={"tasks": 2, "seeds": 2},
)
