"""A covering array: few configurations in which every combination of `strength` option values
meets at least once (where some valid configuration has it).

Greedy, with a fixed seed: each step keeps, of `candidates` random valid configurations, the one
that covers the most combinations not yet covered. The same cases come out on every run.

Example:
    >>> axes = {"a": [0, 1], "b": [0, 1], "c": [0, 1]}
    >>> cases = covering_cases(axes, strength=2)
    >>> all(any(c[x] == u and c[y] == v for c in cases)
    ...     for x, y in (("a", "b"), ("a", "c"), ("b", "c")) for u in (0, 1) for v in (0, 1))
    True
    >>> len(cases) < 8  # fewer than the 2**3 configurations
    True
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable


def _combos(case: tuple, strength: int) -> list[tuple]:
    """The (axis, value) combinations of `strength` axes that one configuration covers."""
    return [
        tuple((i, case[i]) for i in axes)
        for axes in itertools.combinations(range(len(case)), strength)
    ]


def covering_cases(
    axes: dict[str, list],
    valid: Callable[[dict], bool] = lambda case: True,
    strength: int = 3,
    seed: int = 0,
    candidates: int = 64,
) -> list[dict]:
    """Configurations (dicts over `axes`) covering every `strength`-way combination of values
    that some configuration passing `valid` has. Works on value positions, so values need not
    be hashable or have a stable `repr` (functions may be values)."""
    names = list(axes)
    values = list(axes.values())

    def as_dict(case: tuple[int, ...]) -> dict:
        return {n: v[i] for n, v, i in zip(names, values, case, strict=True)}

    positions = itertools.product(*(range(len(v)) for v in values))
    pool = [case for case in positions if valid(as_dict(case))]
    if not pool:
        raise ValueError("covering_cases: no configuration passes `valid`")
    todo = {combo for case in pool for combo in _combos(case, strength)}
    rng = random.Random(seed)
    chosen = []
    while todo:
        best = max(
            rng.sample(pool, min(candidates, len(pool))),
            key=lambda case: sum(c in todo for c in _combos(case, strength)),
        )
        if not any(c in todo for c in _combos(best, strength)):
            # No sampled candidate helps: take a configuration that has an uncovered combination.
            combo = min(todo)
            best = next(case for case in pool if all(case[i] == v for i, v in combo))
        todo.difference_update(_combos(best, strength))
        chosen.append(as_dict(best))
    return chosen
