"""Console-script entry points (`strife-gateway`, `strife-bank`): gRPC's I/O engine is chosen first, before
the server module (and with it grpc) is imported — see servers/grpc_engine.py."""
from __future__ import annotations

from servers import grpc_engine


def gateway() -> None:
    grpc_engine.choose()
    from servers.gateway.server import main
    main()


def bank() -> None:
    grpc_engine.choose()
    from servers.bank.server import main
    main()
