"""Checking that a folder takes writes before work that would be lost if it did not.

Example:
    >>> import tempfile
    >>> cannot_write(Path(tempfile.mkdtemp())) is None
    True
"""

from __future__ import annotations

import os
from pathlib import Path


def cannot_write(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (the reason the OS gave for a probe file), or
    None. `os.access` is not asked: it says yes to root on a read-only mount."""
    probe = folder / f".moeflow_write_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
