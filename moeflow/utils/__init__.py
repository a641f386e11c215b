"""Small runtime helpers that belong to no single component."""

from moeflow.utils.cpu_alloc import keep_freed_memory

__all__ = ["keep_freed_memory"]
