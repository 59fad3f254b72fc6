"""The embcomp gRPC compression service (needs the ``service`` extra).

>>> from embcomp.service import ServiceConfig, create_server   # doctest: +SKIP
>>> server, port = create_server(ServiceConfig(port=0, store="/tmp/codecs"))
>>> server.start()

Modules: ``config`` (settings from flags and ``EMBCOMP_*`` variables), ``store``
(content-addressed codec files), ``convert`` (ndarray <-> proto), ``errors`` (the one
exception -> status table), ``servicer`` (messages -> library calls), ``auth``,
``metrics`` and ``logs`` (observability), ``server`` (``create_server``/``serve``), ``cli``
(``embcomp serve``, ``embcomp health``). Importing this package imports no grpc; the
names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CodecStore", "EmbcompServer", "ServiceConfig", "create_server", "serve"]

_LAZY = {
    "CodecStore": "store",
    "EmbcompServer": "server",
    "ServiceConfig": "config",
    "create_server": "server",
    "serve": "server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
