"""``ml3 tasks``: the registered task families and what their losses see (from the shipped catalog, so that no
task, simulator or torch is imported)."""

from __future__ import annotations

from rich.console import Console

from ml3cli.tasks import read_catalog


def run(console: Console) -> None:
    """One entry per task family: its summary, loss inputs, metric, built-in losses and shaping terms."""
    for name, entry in read_catalog().items():
        inputs = ", ".join(f"{input_name}[{size}]" for input_name, size in entry["loss_inputs"])
        console.print(f"[bold]{name}[/]  {entry['summary']}")
        console.print(
            f"    loss inputs: {inputs}   metric: {entry['metric']}   "
            f"built-in losses: {', '.join(entry['builtin_losses'])}   extra terms: {', '.join(entry['extra_terms']) or '—'}"
        )
