"""``python -m ml3cli.tasks``: regenerate ``catalog.json`` (what ``ml3 tasks`` lists) from the task classes."""

from ml3cli.tasks import write_catalog

print(f"wrote {write_catalog()}")
