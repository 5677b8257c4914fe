"""Experiment tracking: the meta-training curves as TensorBoard event files, beside the CSV.

``ml3 meta-train RECIPE --log-dir runs/tb`` writes every row of the curves (``meta/task_loss``,
``meta/task_loss_before``, ``inner/learned_loss``, ``meta/grad_norm``, ``time/seconds``: the CSV's column names)
as scalars at its outer step, as it is logged, so that ``tensorboard --logdir runs/tb`` shows a long meta-training
while it runs. The writer is torch's ``SummaryWriter``; it needs the ``tensorboard`` package (the optional extra
``[tensorboard]``), imported only when a log folder is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ml3cli.errors import ML3Error


class TensorBoardLog:
    """Scalars of the curve rows written to TensorBoard event files in ``folder``."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing
            raise ML3Error(
                "--log-dir writes TensorBoard event files and needs the tensorboard package: "
                "pip install 'ml3cli[tensorboard]' (or pip install tensorboard)"
            ) from None
        try:
            self.writer: Any = SummaryWriter(log_dir=str(folder))
        except OSError as err:
            raise ML3Error(f"--log-dir {folder}: cannot write there ({err.strerror or err})") from None

    def write(self, row: dict[str, float]) -> None:
        """Every value of one curve row at its outer step (``row["step"]``)."""
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()  # visible to a running tensorboard at once; rows come every log_every outer steps

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
