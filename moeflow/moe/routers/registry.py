"""Routers by name: a config picks one with `router.type`; users register their own.

A factory takes `(config: MoEConfig, shared: nn.ModuleDict | None)` and returns a `Router`.
`shared` is a dict of modules the model shares between its MoE layers (RMoE's GRU cell lives there);
a layer built alone gets None and its router owns what it needs.

Example:
    >>> "topk" in router_names() and "rmoe" in router_names()
    True
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.routers.base import Router

RouterFactory = Callable[[MoEConfig, "nn.ModuleDict | None"], Router]
_ROUTERS: dict[str, RouterFactory] = {}


def register_router(name: str, factory: RouterFactory | None = None):
    """Register `factory` under `name` (usable as a decorator). Re-registering a name is an error,
    so a plugin cannot silently replace a built-in router."""

    def add(f: RouterFactory) -> RouterFactory:
        if name in _ROUTERS and _ROUTERS[name] is not f:
            raise ValueError(f"a router named {name!r} is already registered")
        _ROUTERS[name] = f
        return f

    return add(factory) if factory is not None else add


def router_names() -> list[str]:
    _load_builtins()
    return sorted(_ROUTERS)


def build_router(config: MoEConfig, shared: nn.ModuleDict | None = None) -> Router:
    _load_builtins()
    name = config.router.type
    if name not in _ROUTERS:
        raise ValueError(
            f"moe.router.type ({name!r}) is not a registered router; known: {router_names()} "
            "(register yours with moeflow.moe.routers.register_router)"
        )
    router = _ROUTERS[name](config, shared)
    if not isinstance(router, Router):
        raise TypeError(f"router factory {name!r} returned {type(router).__name__}, not a Router")
    return router


def _load_builtins() -> None:
    # The built-in routers register themselves on import.
    from moeflow.moe.routers import moepp, null, recurrent, topk  # noqa: F401
