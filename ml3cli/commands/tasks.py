"""``ml3 tasks``: the registered task families and what their losses see (from the shipped catalog, so that no
task, simulator or torch is imported)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding

from ml3cli.tasks import read_catalog


def run(console: Console) -> None:
    """One entry per task family: its summary, loss inputs, metric, built-in losses and shaping terms, one per
    line (indented lines wrap under themselves in a narrow terminal)."""
    for name, entry in read_catalog().items():
        inputs = ", ".join(f"{input_name}[{size}]" for input_name, size in entry["loss_inputs"])
        console.print(f"[bold]{name}[/]  {escape(entry['summary'])}")
        details = {
            "loss inputs": inputs,
            "metric": entry["metric"],
            "built-in losses": ", ".join(entry["builtin_losses"]),
            "extra terms": ", ".join(entry["extra_terms"]) or "—",
        }
        for key, value in details.items():
            console.print(Padding(f"{key}: {escape(value)}", (0, 0, 0, 4), expand=False))
