"""The checks every config dataclass runs in `__post_init__`: one wording for the whole package.

Each raises `ValueError` naming the field path, the value and what is allowed.

Example:
    >>> check_choice("parallel.mode", "ep", ("ep", "dp"))
    >>> check_int("parallel.ep", 0)
    Traceback (most recent call last):
    ...
    ValueError: parallel.ep (0) must be an integer >= 1
"""

from __future__ import annotations


def check_choice(path: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{path} ({value!r}) must be one of {list(allowed)}")


def check_int(path: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{path} ({value!r}) must be an integer >= {minimum}")


def check_non_negative(path: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{path} ({value!r}) must be >= 0")
