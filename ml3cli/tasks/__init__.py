"""The registry of task families. A new experiment adds a module here and one line to :data:`REGISTRY`.

Task modules are imported on first use (they bring torch and the simulators), so that listing the tasks
(``ml3 tasks``, from the generated :file:`catalog.json`) and the command line's ``--help`` stay instant.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml3cli.errors import MissingExtra, ML3Error, describe_validation_error, one_of

if TYPE_CHECKING:
    import torch

    from ml3cli.tasks.base import Task, TaskOptions

#: task name → ``module:Class`` of its family
REGISTRY: dict[str, str] = {
    "sine": "ml3cli.tasks.sine:SineRegression",
    "sine_shifted": "ml3cli.tasks.sine:ShiftedSineRegression",
    "sine_frequency": "ml3cli.tasks.shaped_sine:SineFrequency",
    "mnist_binary": "ml3cli.tasks.mnist:MnistBinary",
    "mnist": "ml3cli.tasks.mnist:Mnist",
    "mountain_car": "ml3cli.tasks.mountain_car:MountainCarTask",
    "inverse_dynamics_reacher": "ml3cli.tasks.inverse_dynamics:InverseDynamicsReacher",
    "inverse_dynamics_sawyer": "ml3cli.tasks.inverse_dynamics:InverseDynamicsSawyer",
    "reacher_goal_mf": "ml3cli.tasks.mfrl:ReacherGoalMF",
    "ant_goal": "ml3cli.tasks.mfrl:AntGoal",
    "pointmass_goal": "ml3cli.tasks.mbrl:PointmassGoalTask",
    "reacher_goal": "ml3cli.tasks.mbrl:ReacherGoalTask",
    "reacher_demos": "ml3cli.tasks.reacher_demos:ReacherDemosTask",
}

#: what ``ml3 tasks`` lists, generated from the classes by ``python -m ml3cli.tasks`` (a test keeps it current)
CATALOG = Path(__file__).with_name("catalog.json")


class _Registry(Mapping[str, "type[Task]"]):
    """``TASKS[name]`` imports the family's module when first asked for it."""

    def __getitem__(self, name: str) -> type[Task]:
        module, _, cls = REGISTRY[name].partition(":")
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


TASKS: Mapping[str, type[Task]] = _Registry()


def task_class(name: str) -> type[Task]:
    """The task family called ``name``; an unknown name is a user error listing the known ones."""
    if name not in REGISTRY:
        raise ML3Error(f"unknown task {name!r}{one_of(name, REGISTRY, 'known tasks')} (see `ml3 tasks`)")
    try:
        return TASKS[name]
    except MissingExtra as err:  # a simulator the family imports when its module loads
        raise MissingExtra(f"task {name!r}", err.module, err.extra) from None


def make_options(name: str, options: Mapping[str, Any] | None, where: str = "task_options") -> TaskOptions:
    """Validate ``options`` against the task's option model; errors name ``where.<field>``."""
    from pydantic import ValidationError

    cls = task_class(name)
    try:
        return cls.Options(**dict(options or {}))
    except ValidationError as err:
        raise ML3Error(describe_validation_error(err, prefix=where, model=cls.Options)) from None


def make_task(
    name: str,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    where: str = "task_options",
) -> Task:
    """Build the task family ``name`` with validated ``options`` on ``device``."""
    cls, validated = task_class(name), make_options(name, options, where)
    try:
        return cls(validated, device=device)
    except MissingExtra as err:  # a simulator the family imports when it is built
        raise MissingExtra(f"task {name!r}", err.module, err.extra) from None


def describe(cls: type[Task]) -> dict[str, Any]:
    """What ``ml3 tasks`` shows of a family, as plain data."""
    return {
        "summary": cls.summary,
        "loss_inputs": [[item.name, item.size] for item in cls.loss_inputs_spec],
        "metric": cls.metric,
        "builtin_losses": list(cls.builtin_losses),
        "extra_terms": list(cls.extra_term_names),
    }


def catalog_from_classes() -> dict[str, dict[str, Any]]:
    """Every registered family described by :func:`describe` (imports them all)."""
    return {name: describe(TASKS[name]) for name in sorted(REGISTRY)}


def read_catalog() -> dict[str, dict[str, Any]]:
    """The shipped catalog: the same as :func:`catalog_from_classes` without importing any task."""
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def write_catalog() -> Path:
    """Regenerate :data:`CATALOG` after a task family or its description changes."""
    from ml3cli.files import write_text_atomic

    return write_text_atomic(CATALOG, json.dumps(catalog_from_classes(), indent=1, ensure_ascii=False) + "\n")


def __getattr__(name: str) -> Any:
    if name in ("Task", "TaskOptions", "Theta"):
        return getattr(importlib.import_module("ml3cli.tasks.base"), name)
    raise AttributeError(f"module 'ml3cli.tasks' has no attribute {name!r}")


__all__ = ["REGISTRY", "TASKS", "Task", "TaskOptions", "make_options", "make_task", "read_catalog", "task_class"]
