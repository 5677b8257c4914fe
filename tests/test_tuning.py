"""The learning-rate sweep every comparison tunes with (`ml3 compare --tune-baseline-lr`, `ml3 reproduce`): it trains
on validation tasks of the family it is given, never on a test task."""

from __future__ import annotations

import math

import pytest
import torch

from ml3cli.evaluate import tune_lr
from ml3cli.losses import builtin_loss
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks.sine import ShiftedSineRegression, SineOptions


class DrawnSine(ShiftedSineRegression):
    """The meta-test sine family, recording every task batch it draws."""

    def __init__(self, options):
        super().__init__(options)
        self.drawn = []

    def sample_tasks(self, n, generator):
        self.drawn.append(super().sample_tasks(n, generator))
        return self.drawn[-1]


def test_the_sweep_draws_validation_tasks_of_each_seed_and_never_test_tasks():
    """Each rate is scored on the tasks of the validation stream of each seed asked for (the same seed numbers
    as the test, another stream), so no tuned rate has seen a task it is then tested on."""
    task = DrawnSine(SineOptions(points=8, query_points=8, hidden=[8]))
    seeds = [0, 3]
    best, scores = tune_lr(task, builtin_loss(task, "mse", 1e-2), 1e-2, 2, seeds, 2, span=0.5, max_widenings=0)
    assert best in scores and len(scores) == 3 and task.drawn

    def draws(stream: str) -> list:
        fresh = ShiftedSineRegression(task.options)
        return [fresh.sample_tasks(2, generator(stream_seed(stream, s))) for s in seeds]

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    validation, test = draws("validation"), draws("test")
    foreign = sum(not any(same(batch, v) for v in validation) for batch in task.drawn)
    assert foreign == 0, f"{foreign} of the {len(task.drawn)} batches the sweep drew are not validation tasks"
    tested = sum(any(same(batch, t) for t in test) for batch in task.drawn)
    assert tested == 0, f"{tested} of the {len(task.drawn)} batches the sweep drew are test tasks"


def test_the_sweep_grid_spans_two_decades_either_side_and_widens_at_a_winning_edge():
    """What the guide says of --tune-baseline-lr: half-decade steps two decades either side of the rate (1e-5 …
    0.1 around 1e-3), and two more rates past an edge that wins."""
    from ml3cli.evaluate import lr_grid, widen_until_interior

    assert lr_grid(1e-3) == pytest.approx([10 ** (-5 + k / 2) for k in range(9)], rel=1e-12)
    tried: list[list[float]] = []

    def score(lrs):  # a loss lowest at 1.0: the top edge wins twice, then 1.0 is interior
        tried.append(lrs)
        return {lr: abs(math.log10(lr)) for lr in lrs}

    best, scores = widen_until_interior(score, 1e-3, span=2.0, step=0.5)
    assert best == pytest.approx(1.0) and len(tried) == 3
    assert tried[1] == pytest.approx([10**-0.5, 1.0]) and tried[2] == pytest.approx([10**0.5, 10.0])


def test_the_defaults_try_lr_grid_first_and_widen_three_times_at_most():
    """With its defaults the sweep first scores lr_grid(center) (two decades either side, half a decade apart);
    a score that keeps falling past the top edge is chased three times, then the top rate is taken."""
    from ml3cli.evaluate import lr_grid, widen_until_interior

    tried: list[list[float]] = []

    def falling(lrs):
        tried.append(lrs)
        return {lr: -lr for lr in lrs}

    best, scores = widen_until_interior(falling, 1e-3)
    assert tried[0] == lr_grid(1e-3) and len(tried) == 4
    assert best == pytest.approx(10**2.0) and best == max(scores) and list(scores) == sorted(scores)


def test_a_winning_bottom_edge_widens_downwards_by_the_given_step():
    """A loss lowest at 10^-4.5, a grid a quarter decade apart one decade either side of 1e-3: the bottom edge
    wins twice, each time adding the two rates one and two steps below it."""
    from ml3cli.evaluate import widen_until_interior

    tried: list[list[float]] = []

    def score(lrs):
        tried.append(lrs)
        return {lr: abs(math.log10(lr) + 4.5) for lr in lrs}

    best, scores = widen_until_interior(score, 1e-3, span=1.0, step=0.25)
    assert tried[0] == pytest.approx([10 ** (-4 + k / 4) for k in range(9)], rel=1e-12)
    assert tried[1] == pytest.approx([10**-4.25, 10**-4.5], rel=1e-12)
    assert tried[2] == pytest.approx([10**-4.75, 10**-5], rel=1e-12)
    assert best == pytest.approx(10**-4.5, rel=1e-12) and len(scores) == 13
