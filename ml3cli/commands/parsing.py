"""The values of the options that carry a small language, parsed in one place for every command.

``--seeds`` is a list or range of seeds in every command (``0-4``, ``0,3,7``, ``0-2,9``): the artifacts
``meta-train`` writes, the evaluation seeds of ``meta-test`` and ``compare``. A count of seeds is ``--num-seeds``.
Torch-free, like :mod:`ml3cli.commands.options`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ml3cli.errors import ML3Error

#: the most seeds one ``--seeds`` may name
MAX_SEEDS = 1000


def parse_seeds(spec: str, flag: str = "--seeds") -> list[int]:
    """``0-4`` → [0, 1, 2, 3, 4]; ``0,3,7`` → [0, 3, 7]; ranges and lists combine: ``0-2,9``. Each seed once, in
    the order given."""
    found: list[int] = []
    try:
        for item in spec.split(","):
            low, sep, high = item.strip().partition("-")
            first, last = int(low), int(high) if sep else int(low)
            if last < first or first < 0:
                raise ValueError
            if len(found) + last - first >= MAX_SEEDS:
                raise ML3Error(f"{flag} {spec!r}: more than the {MAX_SEEDS:,} seeds allowed at once")
            found += [s for s in range(first, last + 1) if s not in found]
    except ValueError:
        raise ML3Error(f"{flag} {spec!r}: expected non-negative seeds like 0-4 or 0,3,7") from None
    return found


def seed_range(first: int, count: int) -> list[int]:
    """``count`` consecutive seeds from ``first``: what ``--seed S --num-seeds N`` means."""
    return list(range(first, first + count))


def evaluation_seeds(seeds: str | None, seed: int | None, num_seeds: int | None, default_count: int) -> list[int]:
    """The seeds ``meta-test`` and ``compare`` evaluate on: ``--seeds LIST``, else ``--num-seeds N`` (default
    ``default_count``) consecutive seeds from ``--seed`` (default 0).

    ``--seeds`` names every seed, so it is refused together with ``--seed`` or ``--num-seeds``; so is a bare number
    (``--seeds 5``), which until this version meant five seeds and now would mean the seed 5 alone.
    """
    if seeds is None:
        return seed_range(seed or 0, num_seeds or default_count)
    if seed is not None or num_seeds is not None:
        raise ML3Error(
            f"--seeds {seeds} names every evaluation seed: give either --seeds, or --seed and --num-seeds "
            "(consecutive seeds from --seed)"
        )
    if seeds.strip().isdigit():
        n = int(seeds)
        count = f"for {n} seeds write --num-seeds {n} (or --seeds 0-{n - 1}); " if n > 1 else ""
        raise ML3Error(
            f"--seeds {seeds}: --seeds is a list or range of seeds (as in meta-train), not a count; {count}"
            f"for the seed {n} alone, --seed {n} --num-seeds 1"
        )
    return parse_seeds(seeds)


def parse_steps(spec: str | None, flag: str = "--at") -> tuple[int, ...] | None:
    """``10,100,500`` → (10, 100, 500) for ``--at``; None stays None."""
    if spec is None:
        return None
    try:
        steps = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise ML3Error(f"{flag} {spec!r}: expected comma-separated step numbers like 10,100,500") from None
    if not steps or min(steps) < 0:
        raise ML3Error(f"{flag} {spec!r}: expected non-negative step numbers like 10,100,500")
    return steps


def parse_fix(items: Sequence[str], flag: str = "--fix") -> dict[str, float]:
    """``--fix NAME=NUMBER`` values as a mapping."""
    fixed = {}
    for item in items:
        name, sep, raw = item.partition("=")
        try:
            if not sep:
                raise ValueError
            fixed[name.strip()] = float(raw)
        except ValueError:
            raise ML3Error(f"{flag} {item!r}: expected NAME=NUMBER, e.g. {flag} x=0.5") from None
    return fixed
