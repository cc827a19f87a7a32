"""`python -m servers.bank_server`: one bank (CONTRACT §2). The bank lives in servers/bank/.

servers/launch.py chooses gRPC's I/O engine before the bank (and with it grpc) is imported.
"""
from __future__ import annotations

from servers import launch

if __name__ == "__main__":
    launch.bank()
