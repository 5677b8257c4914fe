"""What a loss takes, without torch: the declared inputs of M_φ and the names of its building blocks.

Kept apart from :mod:`ml3cli.metaloss` so that reading an artifact's metadata (``ml3 inspect``) and listing tasks
need no torch; :mod:`ml3cli.metaloss` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ml3cli.errors import ML3Error

#: hidden-layer activations M_φ can use (:data:`ml3cli.metaloss.ACTIVATIONS` maps them to modules)
ACTIVATION_NAMES = ("relu", "elu", "tanh", "softplus", "sigmoid", "gelu", "silu", "leaky_relu")
#: output layers of M_φ (:data:`ml3cli.metaloss.OUTPUTS`)
OUTPUT_NAMES = ("softplus", "linear")


class LossInputError(ML3Error, ValueError):
    """Loss inputs of the wrong shape, kind or device: the message names the input, what was expected and what
    was given. A ``ValueError`` too, so code that caught the earlier ``ValueError`` keeps working."""


@dataclass(frozen=True)
class LossInput:
    """One named input of a loss: ``size`` features per row.

    ``groups`` names the axes between the batch axis and the features, e.g. ``("class",)`` for class-wise inputs
    (one row per class, summed over by :class:`MetaLoss`); empty (the default) for plain ``[batch, size]`` inputs.
    All inputs of one loss declare the same groups.
    """

    name: str
    size: int
    description: str = ""
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a list (as read from JSON) would make the frozen dataclass unhashable and unequal to the tuple form
        object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))

    @property
    def label(self) -> str:
        """``name[groups…, size]``, e.g. ``y_pred[1]`` or ``prob[class, 1]`` (for messages)."""
        return f"{self.name}[{', '.join((*self.groups, str(self.size)))}]"

    def shapes(self) -> str:
        """The shapes this input accepts, in words, e.g. ``[batch, class, 1] or [batch, class]``."""
        full = ", ".join(("batch", *self.groups, str(self.size)))
        if self.size != 1:
            return f"[{full}]"
        return f"[{full}] or [{', '.join(('batch', *self.groups))}]"


def parameter_shapes(width: int, hidden: tuple[int, ...], bias: bool, learned_lr: bool) -> dict[str, tuple[int, ...]]:
    """The names and shapes of M_φ's parameters (``MetaLoss.state_dict()``) for ``width`` input features, without
    torch: a reader checks a file's tensors against its declared architecture before it allocates a layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    for k, size in enumerate((*hidden, 2 if learned_lr else 1)):  # Linear layers sit at every other index
        shapes[f"net.{2 * k}.weight"] = (size, width)
        if bias:
            shapes[f"net.{2 * k}.bias"] = (size,)
        width = size
    return shapes
