"""The paper's experiments: one module per experiment, each the protocol and the figures of one results table.

A module here reads top to bottom: a docstring naming the paper's section and figure, the task and recipes it
uses and the meta-test protocol; then the code of that protocol (the comparison against the baselines, the
learning-rate choice, the table rows); then the figures (PNG bytes, drawn with :mod:`ml3cli.plots`'s plumbing).
``ml3 reproduce NAME`` runs the one that :data:`REPRODUCIBLE` names.

Layering: an experiment may use the engine, the tasks, the baselines and the primitives (``envs``, ``control``,
``rl``, ``metaloss``, ``plots``, ...); nothing in those imports an experiment, and no experiment imports another
(curves drawn alike by several experiments belong in :mod:`ml3cli.plots`). What does not belong here: a task
(:mod:`ml3cli.tasks`), a method the learned losses are compared with (:mod:`ml3cli.baselines`), a solver or
simulator (:mod:`ml3cli.control`, :mod:`ml3cli.envs`), or anything a command of the CLI needs.

Modules: one per experiment of :data:`REPRODUCIBLE`; :mod:`~ml3cli.experiments.protocol` holds what they share
(the meta-training plan, the fair comparison, the verdict, the schema of ``results.json``), and
:mod:`~ml3cli.experiments.physics_prior` the comparison of the two inverse-dynamics experiments,
:mod:`~ml3cli.experiments.against_ppo` the rows of a learned loss against PPO;
:mod:`~ml3cli.experiments.targets` declares the targets beyond the paper and the comparisons that measure them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml3cli.experiments.protocol import Experiment

#: what ``ml3 reproduce`` runs: experiment name → its module (which declares ``EXPERIMENT``), in the paper's order
REPRODUCIBLE: dict[str, str] = {
    "sine": "ml3cli.experiments.sine",
    "sine_reference": "ml3cli.experiments.sine_reference",
    "shaped_sine": "ml3cli.experiments.shaped_sine",
    "mnist_binary": "ml3cli.experiments.mnist_binary",
    "inverse_dynamics": "ml3cli.experiments.inverse_dynamics",
    "mbrl": "ml3cli.experiments.mbrl",
    "mfrl": "ml3cli.experiments.mfrl",
    "mountain_car": "ml3cli.experiments.mountain_car",
    "reacher_demos": "ml3cli.experiments.reacher_demos",
    # beyond the paper: against baselines at their own tuned rates, with SGD and Adam, with online adaptation
    "beyond_sine": "ml3cli.experiments.beyond_sine",
    "beyond_mnist_binary": "ml3cli.experiments.beyond_mnist_binary",
    "beyond_mnist": "ml3cli.experiments.beyond_mnist",
    "beyond_sawyer": "ml3cli.experiments.beyond_sawyer",
    "beyond_reacher": "ml3cli.experiments.beyond_reacher",
}


def experiment(name: str) -> Experiment:
    """The declared experiment ``name`` (imports its module)."""
    return importlib.import_module(REPRODUCIBLE[name]).EXPERIMENT
