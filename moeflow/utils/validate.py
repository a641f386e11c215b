"""The checks every config dataclass runs in `__post_init__`: one wording for the whole package.

Each raises `ValueError` naming the field path, the value and what is allowed. `readable` cuts
what a user wrote to a length a terminal line can show, in the one place every error line of the
command line passes through (`moeflow.launch.cli`).

Example:
    >>> check_choice("parallel.mode", "ep", ("ep", "dp"))
    >>> check_int("parallel.ep", 0)
    Traceback (most recent call last):
    ...
    ValueError: parallel.ep (0) must be an integer >= 1
    >>> readable("moe.activation ('" + "x" * 1000 + "') must be one of ['relu']", longest=20)
    "moe.activation ('xxxxxxxxxxx...[986 characters cut]...xxx') must be one of ['relu']"
"""

from __future__ import annotations

import os
import re

# What POSIX file systems take: 255 bytes per name (ext4, XFS, APFS, NTFS), 4,096 per path.
NAME_MAX = 255
PATH_MAX = 4096


def check_choice(path: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{path} ({value!r}) must be one of {list(allowed)}")


def check_int(path: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{path} ({value!r}) must be an integer >= {minimum}")


def check_non_negative(path: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{path} ({value!r}) must be >= 0")


def check_path(path: str, value: str) -> None:
    """A file or folder name a file system can take: no NUL byte, names of at most `NAME_MAX`
    bytes, at most `PATH_MAX` bytes in all (checked before anything is opened: the system's own
    error would name neither the field nor the limit).

    Example:
        >>> check_path("train.out_dir", "runs/" + "a" * 300)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: train.out_dir ('runs/aaaa...') has a name of 300 bytes: ...
    """
    if "\0" in value:
        raise ValueError(f"{path} ({value!r}) holds a NUL character; no file name can")
    raw = os.fsencode(value)
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ValueError(
            f"{path} ({value!r}) has a name of {len(longest):,} bytes: file systems take at most "
            f"{NAME_MAX} bytes per name (and {PATH_MAX:,} per path); choose a shorter {path}"
        )
    if len(raw) >= PATH_MAX:
        raise ValueError(
            f"{path} ({value!r}) is {len(raw):,} bytes long: file systems take paths of at most "
            f"{PATH_MAX - 1:,} bytes; choose a shorter {path}"
        )


def readable(message: str, longest: int = 240, limit: int = 1000) -> str:
    """`message` with each unbroken run of more than `longest` characters (a value the user
    wrote: a 10 MB string, a long list) cut in its middle, and the whole cut in its middle past
    `limit` characters, each cut saying how much it left out; the field named at the start and
    the fix at the end stay."""
    head, tail = longest * 2 // 3, longest // 4

    def cut(text: str, keep_head: int, keep_tail: int) -> str:
        gone = len(text) - keep_head - keep_tail
        return f"{text[:keep_head]}...[{gone:,} characters cut]...{text[len(text) - keep_tail :]}"

    message = re.sub(rf"\S{{{longest + 1},}}", lambda m: cut(m.group(), head, tail), message)
    if len(message) > limit:
        message = cut(message, limit // 3, limit // 2)
    return message
