"""What each ``ml3`` command does: one module per command, each with its own printed output and files.

The CLI (:mod:`ml3cli.cli`) parses flags into the option groups of :mod:`ml3cli.commands.options` and calls the
command's ``run``; nothing here parses flags, and nothing below this package prints. Importing this package (or
``options``) does not import torch: the command modules are imported only when their command runs.
"""
