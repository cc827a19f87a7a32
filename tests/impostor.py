"""`python -m tests.impostor servers.bank_server --bank SBI ...`: a real Strife server that skips its own
start-up identity check, as a server run by someone holding a stolen (but CA-signed) key would.

Everything else is real (TLS, certificates, ledger, ports): tests use it to show that the *peers* refuse an
impostor, which is the protection that matters; the start-up check only helps an honest operator."""
from __future__ import annotations

import runpy
import sys

from servers import certs

certs.identity_problem = lambda *args, **kwargs: None  # type: ignore[assignment]

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
