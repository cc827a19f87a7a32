"""`python -m servers.gateway_server`: the gateway program (CONTRACT §2). The gateway lives in servers/gateway/.

servers/launch.py chooses gRPC's I/O engine before the gateway (and with it grpc) is imported.
"""
from __future__ import annotations

from servers import launch

if __name__ == "__main__":
    launch.gateway()
