"""Beyond the paper, sine regression: does a learned loss beat MSE at MSE's OWN tuned rate, with SGD and with Adam,
and what do a long meta-training horizon and online adaptation add?

The paper's sine loss (:mod:`~ml3cli.experiments.sine`) wins only at the paper's rate (1e-3): at its tuned rate MSE
is better, so that loss has learned a step size. Here each ingredient that could make a loss worth more than a
tuned step gets a row, always against MSE at its own rate, trained with the same optimizer:

* **plain ML³**: the paper's recipe ``sine`` (K = 10 inner steps per meta-update, one sine, α = 1e-3);
* **horizon**: the recipes ``sine_horizon`` (SGD) and ``sine_horizon_adam`` (Adam): meta-trained on the test
  family itself (meta-train stream) through all 100 inner steps, so the meta-objective is the test metric;
* **horizon + online adaptation**: the same losses adapting online while each optimizee trains
  (:mod:`ml3cli.engine.online`: after every step, one Adam step on φ by the meta-gradient of the training loss
  through that step; η = 1e-3), tuned with adaptation on as it is tested.

With Adam, the rows train every optimizee with Adam (β = 0.9, 0.999) and tune every rate for Adam, the paper's
plain loss included (meta-trained for SGD: outside what it learned, shown for completeness).

Protocol (:func:`~ml3cli.experiments.protocol.compare_losses`): 3 meta-train seeds per recipe; every loss at its
own rate chosen on validation sine_shifted tasks (the validation stream; a grid of half-decades around the
recipe's rate, widened until interior); 10 test tasks × 5 test seeds, 100 steps; paired 95% intervals over
(meta-train seed × test seed). Metric: MSE on held-out points after 100 steps. The experiment is reproduced when
some row beats MSE at tuned rates; a negative row is reported with its numbers.
"""

from __future__ import annotations

from ml3cli.engine.online import Adaptation
from ml3cli.experiments.protocol import Context, Experiment, compare_losses

#: online adaptation as the rows use it: AdaLFL's one-step look-ahead after every optimizee step
ADAPTATION = Adaptation(every=1, lr=1e-3, unroll=1)

#: optimizer → the recipe meta-trained for it through the whole horizon
HORIZON = {"sgd": "sine_horizon", "adam": "sine_horizon_adam"}


def run(context: Context) -> list[dict]:
    """Three comparisons per optimizer (SGD, Adam): plain ML³, horizon, horizon with online adaptation."""
    rows = []
    for optimizer, horizon in HORIZON.items():
        rows += [
            compare_losses(context, "sine", label=f"{optimizer}: plain ML³ (sine)", optimizer=optimizer),
            compare_losses(context, horizon, label=f"{optimizer}: horizon ({horizon})", optimizer=optimizer),
            compare_losses(
                context, horizon, label=f"{optimizer}: horizon + online adaptation", optimizer=optimizer,
                adaptation=ADAPTATION,
            ),
        ]  # fmt: skip
    return rows


EXPERIMENT = Experiment(
    name="beyond_sine",
    paper="beyond the paper",
    claim="a learned loss trains sine regressors better than MSE at MSE's own tuned rate, with SGD and with Adam",
    recipes=("sine", *HORIZON.values()),
    run=run,
    meta_seeds=3,
    quick={
        "sine": ("outer.steps=10",),
        "sine_horizon": ("outer.steps=5", "inner.steps=10", "inner.reset_every=10", "meta_test.steps=10"),
        "sine_horizon_adam": ("outer.steps=5", "inner.steps=10", "inner.reset_every=10", "meta_test.steps=10"),
    },
    quick_eval={"tasks": 2, "seeds": 2},
)
