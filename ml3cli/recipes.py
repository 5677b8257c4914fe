"""Typed, validated recipes: one YAML file records every setting of a meta-training run.

Loading refuses unknown keys, wrong types, out-of-range values and missing files before any work starts, with a
one-line message that names the file and the field. ``--set key=value`` overrides any field (the value is read
as YAML, so ``--set outer.lr=3e-4`` and ``--set meta_loss.hidden=[50,50]`` both work).

The recipes of the paper's experiments ship with the package (``ml3cli/data/recipes/NAME.yaml``, listed by
``ml3 recipes``): :func:`find_recipe` turns a ``RECIPE`` argument, a file or a packaged name, into its file.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ml3cli.errors import ML3Error, describe_validation_error
from ml3cli.metaloss import ACTIVATIONS, OUTPUTS

#: the folder of the recipes shipped with the package, one ``NAME.yaml`` each (``ml3 recipes`` lists them)
PACKAGED_RECIPES = Path(__file__).resolve().parent / "data" / "recipes"

Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
Output = Literal[tuple(OUTPUTS)]  # type: ignore[valid-type]


#: bounds that every real recipe is far inside; checked before anything is allocated (a width of 10⁶ would ask
#: for terabytes, a list of 200,000 layers for minutes of building)
#: (a rate is bounded only by what float32 holds: a larger one overflows inside Adam, a smaller huge one diverges
#: and is reported as a divergence)
MAX_WIDTH, MAX_LAYERS, MAX_TASKS, MAX_STEPS, MAX_RATE, MAX_SEED = 65_536, 64, 65_536, 100_000_000, 1e30, 2**63 - 1
Rate = Annotated[float, Field(gt=0, le=MAX_RATE)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Count = Annotated[int, Field(ge=1, le=MAX_TASKS)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]


class Section(BaseModel):
    # inf and NaN are no setting: a rate of .inf would run and print a table of NaN
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MetaLossConfig(Section):
    """The architecture of M_φ (paper: 2 hidden layers of 40)."""

    hidden: list[Width] = Field([40, 40], max_length=MAX_LAYERS, description="hidden layer widths")
    activation: Activation = Field("relu", description="hidden activation")
    bias: bool = Field(True, description="linear layers with biases")
    output: Output = Field("softplus", description="output non-linearity: softplus (loss ≥ 0) or linear")
    learned_lr: bool = Field(
        False,
        description="M_φ also outputs the inner learning rate (paper 4.1.2): a second unit sets the step "
        "α·2σ(mean over rows), between 0 and 2α",
    )


#: a decay rate of the inner optimizers (momentum's β, Adam's β₁ and β₂): 1 or more would never forget a gradient
Decay = Annotated[float, Field(ge=0, lt=1)]
#: the inner update rules (:mod:`ml3cli.engine.inner_optimizers`) and the settings each one reads
INNER_OPTIMIZERS: dict[str, tuple[str, ...]] = {"sgd": (), "momentum": ("momentum",), "adam": ("betas", "eps")}


class InnerConfig(Section):
    """The inner loop: gradient steps on θ with the learned loss (SGD, heavy-ball momentum or Adam)."""

    lr: Rate = Field(1e-3, description="α, the inner learning rate (of SGD, momentum or Adam)")
    steps: Annotated[int, Field(ge=1, le=10_000)] = Field(
        1, description="K, differentiable inner steps per meta-update (the meta-gradient flows through all K)"
    )
    reset_every: Steps | None = Field(
        None,
        description="inner steps before θ is re-initialised (a multiple of steps; default: steps, i.e. a fresh θ "
        "every outer step). steps=1, reset_every=M is the paper's 'meta-update after each inner step'.",
    )
    truncate: bool = Field(
        False, description="drop the θ–θ Hessian chain between inner steps, keep the mixed ∂²M/∂θ∂φ term"
    )
    task_loss_at: Literal["last", "every"] = Field(
        "last",
        description="where L_T is taken: after the last inner step, or averaged over the θ after every inner step "
        "(the paper's model-free algorithm 4)",
    )
    optimizer: Literal["sgd", "momentum", "adam"] = Field(
        "sgd",
        description="the inner update rule, differentiated through like SGD (the meta-gradient flows through its "
        "state too): sgd θ ← θ − α·g (the paper's); momentum (heavy ball) v ← β·v + g, θ ← θ − α·v; adam "
        "(bias-corrected) θ ← θ − α·m̂/(√v̂ + eps). A learned step scale (meta_loss.learned_lr) multiplies α in each "
        "rule; the state (v, or m, v and Adam's step count) starts at zero with θ and is reset with it",
    )
    momentum: Decay = Field(0.9, description="β of optimizer momentum, in [0, 1) (0: plain SGD)")
    betas: list[Decay] = Field(
        [0.9, 0.999],
        min_length=2,
        max_length=2,
        description="Adam's decay rates [β₁, β₂] of optimizer adam, each in [0, 1)",
    )
    eps: Annotated[float, Field(gt=0, le=1)] = Field(
        1e-8, description="Adam's ε of optimizer adam, added to √v̂ (in (0, 1])"
    )

    @model_validator(mode="after")
    def _reset_is_multiple(self) -> InnerConfig:
        if self.reset_every is not None and self.reset_every % self.steps:
            raise ValueError(f"reset_every ({self.reset_every}) must be a multiple of steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _settings_of_the_optimizer(self) -> InnerConfig:
        # a setting the chosen rule never reads would be silently ignored: `momentum: 0.5` with optimizer sgd
        for name in ("momentum", "betas", "eps"):
            default = type(self).model_fields[name].default
            if name not in INNER_OPTIMIZERS[self.optimizer] and getattr(self, name) != default:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is a setting of optimizer "
                    f"{next(o for o, used in INNER_OPTIMIZERS.items() if name in used)}, not of {self.optimizer}"
                )
        return self

    @property
    def reset_period(self) -> int:
        return self.reset_every or self.steps


class OuterConfig(Section):
    """The outer loop: Adam on φ."""

    lr: Rate = Field(1e-3, description="η, Adam's learning rate on φ")
    steps: Steps = Field(500, description="outer iterations (meta-updates)")
    tasks: Count = Field(1, description="tasks per meta-batch (vectorised with vmap)")
    grad_clip: PositiveFloat | None = Field(None, description="clip the meta-gradient's global norm to this")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="η over the outer steps: constant, or cosine decay from lr to 0"
    )


class TaskLossConfig(Section):
    """L_T = weight · task loss + Σ extra[name] · extra term (paper, equation 9)."""

    weight: NonNegativeFloat = Field(1.0, description="β, weight of the task's own loss")
    extra: dict[str, NonNegativeFloat] = Field({}, description="γ per named extra (shaping) term of the task")


class MetaTestConfig(Section):
    """How the learned loss is tested: fresh optimizees on new tasks, trained with the learned loss only (and
    meta-training's inner.optimizer)."""

    task: str = Field(description="the meta-test task family")
    task_options: dict[str, Any] = Field({}, description="options of the meta-test task family")
    tasks: Count = Field(10, description="test tasks per seed")
    seeds: Annotated[int, Field(ge=1, le=1000)] = Field(
        5, description="seeds (each draws its own test tasks and initialisations)"
    )
    steps: Steps = Field(100, description="steps of inner.optimizer (SGD by default) per optimizee")
    lr: Rate | None = Field(None, description="learning rate of those steps (default: inner.lr)")
    baseline: str | None = Field(None, description="hand-written loss to compare with (default: the task's)")


class Recipe(Section):
    """Everything a meta-training run needs. ``ml3 meta-train`` stores the effective recipe in the artifact."""

    name: str = Field(
        description="name of the run (a file name: letters, digits and _ . + -, at most 100 characters); the "
        "default artifact is artifacts/<name>.safetensors",
    )
    task: str = Field(description="the meta-train task family (see `ml3 tasks`)")
    task_options: dict[str, Any] = Field({}, description="options of the meta-train task family")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="the one seed that controls φ, θ initialisations and task sampling"
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    threads: int = Field(1, ge=0, le=1024, description="torch intra-op threads (0: torch's default)")
    meta_loss: MetaLossConfig = MetaLossConfig()
    inner: InnerConfig = InnerConfig()
    outer: OuterConfig = OuterConfig()
    task_loss: TaskLossConfig = TaskLossConfig()
    meta_test: MetaTestConfig
    artifact: str | None = Field(
        None,
        description="where to write the learned loss: a relative path inside the folder ml3 runs in (a path "
        "elsewhere is given on the command line, --out)",
    )
    log_every: PositiveInt = Field(10, description="record the curves every this many outer steps")
    checkpoint_every: NonNegativeInt = Field(
        100,
        description="write the full training state (φ, Adam, RNG, θ, task batch, curves) to "
        "ARTIFACT.checkpoint.safetensors every this many outer steps and at the end (0: only on SIGINT/SIGTERM); "
        "`ml3 meta-train RECIPE --resume` continues from it. May differ on resume, as may `artifact`",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", value):
            raise ValueError("must be a file name of letters, digits and _ . + - (at most 100 characters)")
        return value

    @field_validator("artifact")
    @classmethod
    def _artifact_stays_inside(cls, value: str | None) -> str | None:
        # a recipe is a file that may come from anyone: it names files in the run's folder, never elsewhere
        if value is None:
            return value
        path = Path(value)
        if "\x00" in value or path.is_absolute() or ".." in path.parts or not path.name:
            raise ValueError("must be a relative path inside the working folder (no '..', not absolute)")
        if len(value) > 1000 or any(len(part.encode()) > 255 for part in path.parts):
            raise ValueError("is too long for a file name")
        return value

    @property
    def artifact_path(self) -> Path:
        return Path(self.artifact) if self.artifact else Path("artifacts") / f"{self.name}.safetensors"

    @property
    def meta_test_lr(self) -> float:
        return self.meta_test.lr if self.meta_test.lr is not None else self.inner.lr


def checkpoint_path_for(artifact: Path) -> Path:
    """Where meta-training keeps φ's last good state for the artifact ``artifact``."""
    return artifact.with_suffix(".checkpoint.safetensors")


# -- loading --------------------------------------------------------------------------------------------------
#: a recipe is a few kB: larger files, deeper nesting and aliases that expand to more values are refused before
#: they are built
MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES = 256_000, 32, 100_000
#: libyaml's parser where PyYAML was built with it (10× faster on a large file), else PyYAML's own
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YAMLRefused(ValueError):
    """YAML that a recipe never needs (aliases, deep nesting, a key given twice); the message says which."""


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` without what makes a small file expensive or ambiguous: aliases that expand to more
    than :data:`MAX_YAML_NODES` nodes (a 1.5 kB "billion laughs" file expands to gigabytes) or that contain
    themselves, nesting deeper than :data:`MAX_YAML_DEPTH` (checked on the event stream before anything recursive
    runs, and again with the aliases expanded) and a key given twice in one mapping (which YAML would resolve
    silently: the last one wins). An alias that shares a section (``meta_test: {task_options: *train}``) is fine.
    Raises :class:`YAMLRefused` or ``yaml.YAMLError``."""
    depth = 0
    for event in yaml.parse(text, Loader=YAML_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YAMLRefused(f"line {event.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    loader = YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded(root: yaml.Node) -> None:
    """The size and depth of the document with every alias expanded (each shared node counted once per use, its
    numbers memoised, so a billion laughs is refused after a few levels), no alias inside what it names, and no
    key twice in one mapping."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    in_progress: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, finished = todo.pop()
        key = id(node)
        children = _children(node)
        if finished:
            in_progress.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise YAMLRefused(
                    f"line {node.start_mark.line + 1}: aliases expand to more than {MAX_YAML_NODES:,} values"
                )
            if depth[key] > MAX_YAML_DEPTH:
                raise YAMLRefused(f"line {node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            continue
        if key in size:
            continue
        if key in in_progress:
            raise YAMLRefused(f"line {node.start_mark.line + 1}: an alias refers to a section that contains it")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if (k.tag, k.value) in seen:
                        raise YAMLRefused(f"line {k.start_mark.line + 1}: key `{k.value[:60]}` is given twice")
                    seen.add((k.tag, k.value))
        in_progress.add(key)
        todo.append((node, True))
        todo.extend((child, False) for child in children)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ML3Error(f"--set {item!r}: expected KEY=VALUE, e.g. --set outer.lr=3e-4")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except YAMLRefused as err:
            raise ML3Error(f"--set {item[:80]!r}: {err}") from None
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ML3Error(f"--set {item!r}: `{'.'.join(parents[: i + 1])}` is not a section")
            node = child
        node[leaf] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file's mapping; a missing, unreadable or non-mapping file is one ML3Error naming it."""
    if not path.is_file():
        raise ML3Error(f"recipe file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ML3Error(f"{path}: {path.stat().st_size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except YAMLRefused as err:
        raise ML3Error(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ML3Error(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise ML3Error(f"{path}: not a text file (expected a YAML recipe)") from None
    if not isinstance(data, dict):
        raise ML3Error(f"{path}: expected a mapping of recipe fields at the top level, got {type(data).__name__}")
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate ``data`` as a recipe, including the task names, their options and the extra terms."""
    from ml3cli.tasks import make_options, task_class

    try:
        recipe = Recipe(**data) if all(isinstance(k, str) for k in data) else Recipe.model_validate(data)
    except ValidationError as err:
        raise ML3Error(f"{source}: {describe_validation_error(err, model=Recipe)}") from None
    except TypeError as err:  # non-string keys at the top level
        raise ML3Error(f"{source}: {err}") from None
    try:
        where = "field `task`: "
        train_cls = task_class(recipe.task)
        where = "field `meta_test.task`: "
        test_cls = task_class(recipe.meta_test.task)
        where = ""  # make_options names the field itself
        train_inputs = train_cls.inputs_for(make_options(recipe.task, recipe.task_options, "task_options"))
        test_options = make_options(recipe.meta_test.task, recipe.meta_test.task_options, "meta_test.task_options")
        test_inputs = test_cls.inputs_for(test_options)
    except ML3Error as err:
        raise ML3Error(f"{source}: {where}{err}") from None
    if train_inputs != test_inputs:
        describe = lambda inputs: ", ".join(f"{i.name}[{i.size}]" for i in inputs)  # noqa: E731
        raise ML3Error(
            f"{source}: field `meta_test.task`: {recipe.meta_test.task!r} takes loss inputs "
            f"({describe(test_inputs)}) but the meta-train task gives ({describe(train_inputs)})"
        )
    unknown = sorted(set(recipe.task_loss.extra) - set(train_cls.extra_term_names))
    if unknown:
        known = sorted(train_cls.extra_term_names) or "none"
        raise ML3Error(
            f"{source}: field `task_loss.extra`: unknown term(s) {unknown} for {recipe.task!r} (known: {known})"
        )
    baseline = recipe.meta_test.baseline
    if baseline is not None and baseline not in test_cls.builtin_losses:
        raise ML3Error(
            f"{source}: field `meta_test.baseline`: {baseline!r} is not a loss of {recipe.meta_test.task!r} "
            f"(known: {sorted(test_cls.builtin_losses)})"
        )
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> Recipe:
    """Read, override and validate a recipe: a file, or a packaged recipe by name (see :func:`find_recipe`)."""
    path = find_recipe(path)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    if seed is not None:
        data["seed"] = seed
    return recipe_from_dict(data, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The effective recipe as plain JSON-ready data (what artifacts and checkpoints record)."""
    return recipe.model_dump(mode="json")


# -- the packaged recipes -------------------------------------------------------------------------------------
def packaged_recipes() -> dict[str, Path]:
    """Name → file of every recipe shipped with the package, in name order (the name is the file's stem, and
    also the recipe's ``name``, so ``ml3 meta-train sine`` writes ``artifacts/sine.safetensors``)."""
    return {path.stem: path for path in sorted(PACKAGED_RECIPES.glob("*.yaml"))}


def find_recipe(recipe: str | Path) -> Path:
    """The recipe file a ``RECIPE`` argument means, from any working folder. In this order:

    1. an existing file: that file (your own recipe, or your edited copy of a packaged one, always wins);
    2. the name of a packaged recipe (``sine``): its file in ``ml3cli/data/recipes/``;
    3. a missing ``…/recipes/NAME.yaml`` whose NAME is packaged (``recipes/sine.yaml``, as the README and the
       recipes' comments write it): the packaged recipe NAME.

    Anything else is an :class:`~ml3cli.errors.ML3Error` that names the closest packaged recipe and how to list
    them all.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    known = packaged_recipes()
    text = str(recipe)
    if text in known:
        return known[text]
    if path.suffix in (".yaml", ".yml") and path.parent.name == "recipes" and path.stem in known:
        return known[path.stem]
    close = difflib.get_close_matches(path.stem, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if path.suffix or len(path.parts) > 1:
        raise ML3Error(
            f"recipe file not found: {text}; {hint}give a YAML file or a packaged recipe's name (`ml3 recipes`)"
        )
    raise ML3Error(
        f"unknown recipe {text!r}: neither a file nor a packaged recipe; {hint}packaged: {', '.join(known)} "
        "(`ml3 recipes` describes them)"
    )


@dataclass(frozen=True)
class RecipeSummary:
    """One line of ``ml3 recipes``: a packaged recipe's name, tasks, outer steps and what it is about."""

    name: str
    task: str
    test_task: str
    outer_steps: int
    description: str
    path: Path


def summarize_recipe(path: Path) -> RecipeSummary:
    """The summary of a recipe file, read as plain YAML (no validation, no task imported): its description is
    the first sentence of its header comment."""
    data = read_yaml(path)
    outer = data.get("outer") if isinstance(data.get("outer"), dict) else {}
    test = data.get("meta_test") if isinstance(data.get("meta_test"), dict) else {}
    return RecipeSummary(
        str(data.get("name", path.stem)),
        str(data.get("task", "?")),
        str(test.get("task", "?")),
        int(outer.get("steps", OuterConfig.model_fields["steps"].default)),
        header_sentence(path.read_text(encoding="utf-8")),
        path,
    )


def header_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of the ``#`` comment block at the top of a YAML file: up to the first ``: `` or ``. ``
    outside parentheses, shortened to ``limit`` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    header = " ".join(lines)
    depth = 0
    for i, char in enumerate(header):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ":." and header[i + 1 : i + 2] in (" ", ""):
            header = header[:i]
            break
    return header if len(header) <= limit else header[: limit - 1].rstrip() + "…"
