"""`python -m servers.gateway_server`: the gateway program (CONTRACT §2). The gateway lives in servers/gateway/.

gRPC's I/O engine is chosen before the gateway (and with it grpc) is imported: see servers/grpc_engine.py.
"""
from __future__ import annotations

from servers import grpc_engine

if __name__ == "__main__":
    grpc_engine.choose()
    from servers.gateway.server import main

    main()
