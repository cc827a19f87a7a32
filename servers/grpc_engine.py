"""Which of gRPC's two I/O engines the servers run on — decided before `grpc` is imported, because gRPC reads
its configuration once, at import.

gRPC ≥ 1.6x does network I/O on its EventEngine: a pool of threads reads and writes the sockets and hands each
completed operation to the Python poller thread, which wakes the asyncio loop — three threads per event. Its
older pollers (still in gRPC, selected with `GRPC_EXPERIMENTS`) poll the sockets from the poller thread
itself: one hand-off fewer per event. A payment is ≈ 10 such events in series (the wallet's call, a Prepare
and a Commit frame each way to each bank, and their write completions), so on the 2-core machine the
benchmark runs on, sequential payments were faster with the older pollers in 13 of 16 paired runs (medians
+16 % and +23 % in two sets of 8), the concurrent rate unchanged (medians −2 % and +1 %), the gateway's
futex calls per payment halved (strace: 24 → 11).

Only for the gRPC versions this was measured and tested with (a later gRPC may drop the older pollers);
an operator's own `GRPC_EXPERIMENTS` wins, and `STRIFE_GRPC_ENGINE=default` keeps gRPC's default. The server
programs call `choose()` before importing grpc (`python -m servers.…` and the `strife-gateway`/`strife-bank`
scripts); importing a server module as a library changes nothing.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

TESTED_VERSIONS = ("1.85.",)
OLDER_POLLERS = ("-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints,"
                 "-event_engine_callback_cq")
_decision: str | None = None


def choose(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> str:
    """Select the older pollers if that is safe and nobody chose otherwise; returns what was decided (also
    kept for `describe`)."""
    global _decision
    _decision = _choose(environ, grpc_imported="grpc" in sys.modules)
    return _decision


def describe() -> str:
    """What this process runs on, for the server's start-up log line."""
    return _decision or "gRPC's default I/O engine (imported as a library: no choice made)"


def _choose(environ: "os._Environ[str] | dict[str, str]", *, grpc_imported: bool) -> str:
    if grpc_imported:
        return "gRPC's default I/O engine (grpc was imported before the choice could be made)"
    wish = environ.get("STRIFE_GRPC_ENGINE", "")
    if wish == "default":
        return "gRPC's default I/O engine (STRIFE_GRPC_ENGINE=default)"
    note = f"; STRIFE_GRPC_ENGINE={wish!r} ignored: the only value it takes is 'default'" if wish else ""
    if "GRPC_EXPERIMENTS" in environ:
        return f"GRPC_EXPERIMENTS={environ['GRPC_EXPERIMENTS']} (set by the operator){note}"
    try:
        version = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        return f"gRPC's default I/O engine (grpcio's version is unknown){note}"
    if not version.startswith(TESTED_VERSIONS):
        return (f"gRPC's default I/O engine (grpcio {version} is not a version the older pollers were tested"
                f" with){note}")
    environ["GRPC_EXPERIMENTS"] = OLDER_POLLERS
    return f"gRPC's older pollers (grpcio {version}; GRPC_EXPERIMENTS={OLDER_POLLERS}){note}"
