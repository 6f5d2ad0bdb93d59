"""Benchmarks (`tgpo-jax bench ...`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def emit_table(head: Sequence[str], rows: Sequence[Sequence[str]], emit: Callable[[str], None]) -> None:
    """Prints an aligned text table, indented two spaces: first column left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        emit("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
