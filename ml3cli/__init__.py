"""ml3: Meta Learning via Learned Loss (Bechtle et al., 2021).

Learn a loss function M_φ once with ``ml3 meta-train``, then train new models with it in any PyTorch loop::

    from ml3cli import load_loss
    loss_fn = load_loss("artifacts/sine.safetensors")   # a torch.nn.Module
    loss = loss_fn(y_pred, y_true); loss.backward()
"""

from __future__ import annotations

__version__ = "0.1.0"

from ml3cli.artifacts import load_loss, read_info, save_loss
from ml3cli.errors import ML3Error
from ml3cli.metaloss import LossInput, MetaLoss

__all__ = ["LossInput", "ML3Error", "MetaLoss", "__version__", "load_loss", "read_info", "save_loss"]
