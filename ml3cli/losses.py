"""Losses by name: what a ``--loss`` value means, and the test settings an artifact recorded for itself.

A ``--loss`` value is a built-in hand-written loss of the task (``mse``), optionally with its own learning rate
(``mse@0.01``), the path of a learned-loss artifact (``artifacts/sine.safetensors``, also with ``@LR``), or the
name of a loss shipped with the package (``sine``, ``sine@0.01``; ``ml3 losses`` lists them).
An artifact records how ``ml3 meta-train`` meta-tested it (test task, its options, tasks, seeds, steps, lr):
:func:`recorded_test_settings` reads those once, and every command that tests or plots a loss takes its defaults
from there, so the same artifact is always judged on the same held-out tasks unless the user says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml3cli import artifacts, shipped
from ml3cli.engine import InnerOptimizer, optimizer_for
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import INNER_OPTIMIZERS, InnerConfig, apply_overrides, packaged_recipes
from ml3cli.tasks import Task, make_task, task_class

#: the SGD learning rate of a loss when neither ``@LR``, ``--lr``, nor the artifact says otherwise.
FALLBACK_LR = 1e-3


def builtin_loss(task: Task, name: str, lr: float, label: str | None = None) -> NamedLoss:
    """The task's hand-written loss ``name`` (e.g. ``mse``) at SGD learning rate ``lr``, labelled ``label``."""
    fn = task.builtin_losses[name]
    return NamedLoss(label or name, lambda inputs: fn(**inputs), lr, "builtin")


def baseline_name(task: Task) -> str:
    """The task's default baseline: its first hand-written loss."""
    return next(iter(task.builtin_losses))


@dataclass(frozen=True)
class ResolvedLoss:
    """A ``--loss`` value made concrete: the loss to train with, and for an artifact the module and its metadata."""

    named: NamedLoss
    module: MetaLoss | None = None
    info: dict[str, Any] | None = None
    builtin: str | None = None  # the built-in loss's name, for a built-in


@dataclass(frozen=True)
class LossSpec:
    """A ``--loss`` value: ``NAME``, ``NAME@LR``, ``PATH`` or ``PATH@LR``.

    A value names, in this order of precedence: a built-in hand-written loss of the task (``mse``: a shipped loss
    of the same name is not reachable by name on that task), an existing artifact file (a file ``./sine`` wins
    over the shipped ``sine``), a shipped loss (``sine``, see :mod:`ml3cli.shipped`).
    """

    text: str

    @property
    def body(self) -> str:
        """The value without its ``@LR`` suffix."""
        return self.text.partition("@")[0]

    @property
    def lr(self) -> float | None:
        """The learning rate after ``@``, or None; a malformed or non-positive rate is a user error."""
        _, sep, lr_text = self.text.partition("@")
        if not sep:
            return None
        try:
            lr = float(lr_text)
        except ValueError:
            raise ML3Error(f"--loss {self.text!r}: the part after @ must be a learning rate, e.g. mse@0.01") from None
        if not lr > 0:
            raise ML3Error(f"--loss {self.text!r}: the learning rate must be positive")
        return lr

    def names_builtin_of(self, task_name: str) -> bool:
        """Whether the value is one of the hand-written losses of the task family ``task_name``."""
        return self.body in task_class(task_name).builtin_losses

    def artifact_path(self, task_name: str | None) -> Path | None:
        """The artifact file this value names (an existing file, else a shipped loss's), or None for a built-in,
        a missing file or an unknown name."""
        if task_name is not None and self.names_builtin_of(task_name):
            return None
        path = Path(self.body)
        return path if path.is_file() else shipped.shipped_path(self.body)

    def resolve(self, task: Task, default_lr: float | None, device: torch.device) -> ResolvedLoss:
        """The loss on ``task``: a built-in at ``@LR``, else ``default_lr``, else :data:`FALLBACK_LR`; an artifact
        at ``@LR``, else ``default_lr``, else the inner learning rate it was meta-trained with."""
        lr = self.lr
        suffix = self.text[len(self.body) :]
        if self.body in task.builtin_losses:
            named = builtin_loss(task, self.body, lr or default_lr or FALLBACK_LR, self.body + suffix)
            return ResolvedLoss(named, builtin=self.body)
        path = Path(self.body)
        source = str(path)
        if not path.exists():
            found = shipped.shipped_path(self.body)
            if found is None:
                raise ML3Error(self.missing_message(task))
            path, source = found, f"shipped:{self.body}"
        module = artifacts.load_loss(path, expect_inputs=task.loss_inputs_spec).to(device)
        info = module.info
        chosen = lr or default_lr or (info["recipe"].get("inner") or {}).get("lr") or FALLBACK_LR
        named = NamedLoss(path.stem + suffix, module.as_loss_fn(), chosen, source, module)
        return ResolvedLoss(named, module, info)

    def missing_message(self, task: Task) -> str:
        """Why the value names nothing, and what to do: for a missing ``artifacts/NAME.safetensors`` (a fresh
        clone: nothing meta-trained yet), the command that writes it and the shipped loss of that name."""
        path = Path(self.body)
        if path.suffix == ".safetensors" or len(path.parts) > 1:
            fixes = []
            if path.stem in packaged_recipes():
                fixes.append(f"meta-train it first with `ml3 meta-train recipes/{path.stem}.yaml`")
            if path.stem in shipped.shipped_names():
                fixes.append(f"use the shipped loss `{path.stem}` (--loss {path.stem}{self.text[len(self.body) :]})")
            fix = ", or ".join(fixes) or "`ml3 losses` lists the shipped losses, usable by name"
            return f"--loss {self.text!r}: no such file; {fix}"
        names = ", ".join(shipped.shipped_names()) or "none"
        return (
            f"--loss {self.text!r}: neither a built-in loss of {task.name!r} ({', '.join(task.builtin_losses)}), "
            f"nor a shipped loss ({names}; `ml3 losses`), nor an existing artifact file"
        )


def resolve_losses(
    specs: Sequence[str], task: Task, default_lr: float | None, device: torch.device
) -> list[ResolvedLoss]:
    """Every ``--loss`` value on ``task``; two values with the same label are refused (each loss once)."""
    if not specs:
        raise ML3Error("give at least one --loss (an artifact path or a built-in name such as mse)")
    resolved = [LossSpec(spec).resolve(task, default_lr, device) for spec in specs]
    labels = [r.named.label for r in resolved]
    if len(set(labels)) != len(labels):
        raise ML3Error(f"two --loss values share the label {labels}; give each loss once")
    return resolved


@dataclass(frozen=True)
class TestSettings:
    """What an artifact recorded about how it is tested on a task family (empty: nothing recorded)."""

    task_options: dict[str, Any] = field(default_factory=dict)
    tasks: int | None = None
    seeds: int | None = None
    steps: int | None = None
    lr: float | None = None


#: task options that say where files go: they come from the user (recipe, command line, environment), never from
#: an artifact, so an artifact cannot choose where ml3 writes
LOCAL_OPTIONS = frozenset({"cache_dir"})


def artifact_infos(specs: Sequence[str], task_name: str | None) -> list[dict[str, Any]]:
    """The metadata of every artifact among ``specs``, in order (built-ins and missing files skipped), with the
    recorded settings a command may take from it checked (:func:`checked_recipe_settings`)."""
    paths = [LossSpec(spec).artifact_path(task_name) for spec in specs]
    return [checked_recipe_settings(path, artifacts.read_info(path)) for path in paths if path is not None]


def checked_recipe_settings(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` after validating what commands take from its recipe (``meta_test``, ``inner.lr``) by the recipe
    schema, each refused in one line naming the artifact and the field; :data:`LOCAL_OPTIONS` are dropped."""
    from pydantic import ValidationError

    from ml3cli.errors import describe_validation_error
    from ml3cli.recipes import InnerConfig, MetaTestConfig

    recipe = info.get("recipe") or {}
    for key, model in (("meta_test", MetaTestConfig), ("inner", InnerConfig)):
        if recipe.get(key) is None:
            continue
        try:
            model.model_validate(recipe[key])
        except ValidationError as err:
            detail = describe_validation_error(err, f"recipe.{key}", model)
            raise ML3Error(f"{path}: the artifact's recorded recipe is malformed: {detail}") from None
        if key == "meta_test" and isinstance(recipe[key].get("task_options"), dict):
            options = recipe[key]["task_options"]
            recipe[key]["task_options"] = {k: v for k, v in options.items() if k not in LOCAL_OPTIONS}
    if isinstance(recipe.get("task_options"), dict):
        recipe["task_options"] = {k: v for k, v in recipe["task_options"].items() if k not in LOCAL_OPTIONS}
    return info


def recorded_test_settings(infos: Sequence[dict[str, Any]], task_name: str) -> TestSettings:
    """The settings the first artifact that knows ``task_name`` recorded for it: its meta-test settings when it
    was meta-tested on that family, else the task options it was meta-trained with on it."""
    for info in infos:
        recipe = info.get("recipe") or {}
        test = recipe.get("meta_test") or {}
        if test.get("task") == task_name:  # its meta-test lr is meta_test.lr, else inner.lr (Recipe.meta_test_lr)
            return TestSettings(
                dict(test.get("task_options") or {}), test.get("tasks"), test.get("seeds"), test.get("steps"),
                test.get("lr") or (recipe.get("inner") or {}).get("lr"),
            )  # fmt: skip
        if recipe.get("task") == task_name:
            return TestSettings(dict(recipe.get("task_options") or {}))
    return TestSettings()


def recorded_inner(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``inner`` section of the first artifact that recorded a recipe (its ``optimizer`` and that optimizer's
    settings, checked by :func:`checked_recipe_settings`), else empty."""
    for info in infos:
        inner = (info.get("recipe") or {}).get("inner")
        if isinstance(inner, dict):
            return inner
    return {}


def inner_optimizer(name: str | None, recorded: dict[str, Any]) -> InnerOptimizer:
    """The inner optimizer of a meta-test: ``--optimizer`` ``name``, else the recorded ``inner.optimizer``, else
    sgd, with the settings the artifact recorded for that rule (momentum's β, Adam's betas and ε) or the defaults."""
    chosen = name or recorded.get("optimizer") or "sgd"
    if chosen not in INNER_OPTIMIZERS:
        raise ML3Error(f"--optimizer {chosen!r}: expected one of {', '.join(INNER_OPTIMIZERS)}")
    settings = {key: recorded[key] for key in INNER_OPTIMIZERS[chosen] if key in recorded}
    return optimizer_for(InnerConfig(optimizer=chosen, **settings))


def make_test_task(
    name: str, recorded: TestSettings, overrides: Sequence[str], device: torch.device | str = "cpu"
) -> Task:
    """The task family ``name`` with the recorded options, changed by ``--task-option KEY=VALUE`` overrides."""
    bad = [item for item in overrides if "=" not in item or not item.partition("=")[0].strip()]
    if bad:
        raise ML3Error(f"--task-option {bad[0]!r}: expected KEY=VALUE, e.g. --task-option architecture=mlp")
    options = apply_overrides(dict(recorded.task_options), list(overrides))
    return make_task(name, options, device, where="--task-option" if overrides else "task_options")
