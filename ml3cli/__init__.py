"""ml3: Meta Learning via Learned Loss (Bechtle et al., 2021).

Learn a loss function M_φ once with ``ml3 meta-train``, then train new models with it in any PyTorch loop::

    from ml3cli import load_loss
    loss_fn = load_loss("artifacts/sine.safetensors")   # a torch.nn.Module
    loss = loss_fn(y_pred, y_true); loss.backward()

The public names are imported on first use (PEP 562), so that ``import ml3cli`` and the command line's
``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import sys

if sys.orig_argv[1:3] == ["-m", "ml3cli"] or sys.argv[0].endswith(("/ml3", "\\ml3", "\\ml3.exe")):
    # the command line is starting: a Ctrl-C before it can handle one ends it quietly (ml3cli.entry takes over)
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module that defines it
_PUBLIC = {
    "load_loss": "ml3cli.artifacts",
    "read_info": "ml3cli.artifacts",
    "save_loss": "ml3cli.artifacts",
    "ML3Error": "ml3cli.errors",
    "LossInput": "ml3cli.metaloss",
    "MetaLoss": "ml3cli.metaloss",
    "OnlineLoss": "ml3cli.engine.online",
}

__all__ = ["LossInput", "ML3Error", "MetaLoss", "OnlineLoss", "__version__", "load_loss", "read_info", "save_loss"]

if TYPE_CHECKING:
    from ml3cli.artifacts import load_loss, read_info, save_loss
    from ml3cli.engine.online import OnlineLoss
    from ml3cli.errors import ML3Error
    from ml3cli.metaloss import LossInput, MetaLoss


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'ml3cli' has no attribute {name!r}")
