"""Inverse dynamics with a physics prior (paper, section 4.2.2, equation 10, figure 5c–d): a loss meta-trained with
the simulator's inertia matrix in its task loss, β·torque MSE + γ·‖M_θ(q) − M(q)‖²_F, trains Deep-Lagrangian
inverse-dynamics models of the 2-link Reacher and of the 7-DoF Sawyer on new trajectories better than torque MSE
AND better than a loss meta-trained without the prior (task loss torque MSE only); the prior is never seen at
meta-test.

Task families ``inverse_dynamics_reacher`` and ``inverse_dynamics_sawyer`` (:mod:`ml3cli.tasks.inverse_dynamics`);
recipes ``inverse_dynamics_reacher`` / ``inverse_dynamics_sawyer`` (with the prior) and their ``…_noprior``
controls, 3 meta-train seeds each. Meta-test on the recipes' ``split: meta_test`` trajectories (never seen at
meta-train): 4 tasks × 5 test seeds, 1000 SGD steps from the same θ₀ for every loss, at the recipe's rate (1e-3
for the Reacher, 1e-4 for the Sawyer) and each loss at its own rate. Metric: torque MSE on held-out trajectories
after 1000 steps; the inertia error ‖M_θ − M‖_F at that step is stored in ``extra``.

The comparisons, the rate tuning on validation trajectories and the counting of environment samples are
:func:`ml3cli.experiments.physics_prior.compare_robot`'s (shared with ``beyond_sawyer``): per robot, the loss learned
with the prior against torque MSE, the loss learned without it against torque MSE (a control: the paper expects no
gain; on the Reacher it is the worst of the three, on the Sawyer MSE is slower but reaches the same error), and
the loss learned with the prior against the one learned without it, the comparison the claim is about.

The experiment is reproduced when the prior's loss beats both torque MSE and the loss without the prior, at tuned
rates, on both robots.
"""

from __future__ import annotations

from typing import Any

from ml3cli.experiments.physics_prior import compare_robot
from ml3cli.experiments.protocol import Context, Experiment

#: robot → (recipe with the physics prior, the same recipe without it)
ROBOTS = {
    "Reacher": ("inverse_dynamics_reacher", "inverse_dynamics_reacher_noprior"),
    "Sawyer": ("inverse_dynamics_sawyer", "inverse_dynamics_sawyer_noprior"),
}


def run(context: Context) -> list[dict[str, Any]]:
    """Three comparisons per robot: prior vs torque MSE, no prior vs torque MSE (control), prior vs no prior."""
    comparisons: list[dict[str, Any]] = []
    for robot, (prior, noprior) in ROBOTS.items():
        comparisons += compare_robot(context, robot, prior, noprior)
    return comparisons


EXPERIMENT = Experiment(
    name="inverse_dynamics",
    paper="4.2.2, figure 5c–d",
    claim=(
        "a loss learned with the simulator's inertia matrix as a physics prior trains inverse-dynamics models of the "
        "Reacher and the Sawyer better than torque MSE and than a loss learned without the prior"
    ),
    recipes=(*ROBOTS["Reacher"], *ROBOTS["Sawyer"]),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=20", "meta_test.steps=100"),
    quick_eval={"tasks": 2, "seeds": 2},
)
