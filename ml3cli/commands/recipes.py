"""``ml3 recipes``: the recipes shipped with the package, by name (read as plain YAML: no task, no torch)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ml3cli.recipes import PACKAGED_RECIPES, RecipeSummary, packaged_recipes, summarize_recipe


def run(console: Console) -> list[RecipeSummary]:
    """One row per packaged recipe: name, meta-train → meta-test task, outer steps, the first sentence of its
    header comment; then where the files are and how to run one."""
    summaries = [summarize_recipe(path) for path in packaged_recipes().values()]
    table = Table(title=f"packaged recipes ({len(summaries)})", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("task → meta-test", no_wrap=True)
    table.add_column("outer steps", justify="right")
    table.add_column("what")
    for s in summaries:
        task = s.task if s.test_task == s.task else f"{s.task} → {s.test_task}"
        table.add_row(s.name, task, f"{s.outer_steps:,}", s.description)
    console.print(table)
    console.print(
        "run one with `ml3 meta-train NAME` (or `ml3 meta-train recipes/NAME.yaml`, from any folder); change it with "
        f"--set KEY=VALUE, or copy it from {PACKAGED_RECIPES} and give the copy's path",
        soft_wrap=True,
    )
    return summaries
