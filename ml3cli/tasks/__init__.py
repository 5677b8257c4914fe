"""The registry of task families. A new experiment adds a module here and one line to ``TASKS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError

from ml3cli.errors import ML3Error, describe_validation_error
from ml3cli.tasks.base import Task, TaskOptions
from ml3cli.tasks.inverse_dynamics import InverseDynamicsReacher, InverseDynamicsSawyer
from ml3cli.tasks.mbrl import PointmassGoalTask, ReacherGoalTask
from ml3cli.tasks.mfrl import AntGoal, ReacherGoalMF
from ml3cli.tasks.mnist import Mnist, MnistBinary
from ml3cli.tasks.mountain_car import MountainCarTask
from ml3cli.tasks.reacher_demos import ReacherDemosTask
from ml3cli.tasks.shaped_sine import SineFrequency
from ml3cli.tasks.sine import ShiftedSineRegression, SineRegression

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SineRegression, ShiftedSineRegression, SineFrequency, MnistBinary, Mnist)
}
TASKS[MountainCarTask.name] = MountainCarTask
TASKS.update({cls.name: cls for cls in (InverseDynamicsReacher, InverseDynamicsSawyer)})
TASKS.update({cls.name: cls for cls in (ReacherGoalMF, AntGoal)})
TASKS.update({cls.name: cls for cls in (PointmassGoalTask, ReacherGoalTask)})
TASKS[ReacherDemosTask.name] = ReacherDemosTask


def task_class(name: str) -> type[Task]:
    """The task family called ``name``; an unknown name is a user error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ML3Error(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def make_options(name: str, options: Mapping[str, Any] | None, where: str = "task_options") -> TaskOptions:
    """Validate ``options`` against the task's option model; errors name ``where.<field>``."""
    cls = task_class(name)
    try:
        return cls.Options(**dict(options or {}))
    except ValidationError as err:
        raise ML3Error(describe_validation_error(err, prefix=where)) from None


def make_task(
    name: str,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    where: str = "task_options",
) -> Task:
    """Build the task family ``name`` with validated ``options`` on ``device``."""
    return task_class(name)(make_options(name, options, where), device=device)


__all__ = ["TASKS", "Task", "TaskOptions", "make_options", "make_task", "task_class"]
