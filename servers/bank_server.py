"""`python -m servers.bank_server`: one bank (CONTRACT §2). The bank lives in servers/bank/.

gRPC's I/O engine is chosen before the bank (and with it grpc) is imported: see servers/grpc_engine.py.
"""
from __future__ import annotations

from servers import grpc_engine

if __name__ == "__main__":
    grpc_engine.choose()
    from servers.bank.server import main

    main()
