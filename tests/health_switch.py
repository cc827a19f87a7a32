"""`python -m tests.health_switch servers.gateway_server --port ...`: a real Strife server whose health status a
test can switch: SIGUSR1 makes it report NOT_SERVING, SIGUSR2 SERVING again.

Everything else is real (TLS, store, banks, the standard health service and its Watch stream). The servers
report NOT_SERVING only for the instant between SIGTERM and closing their port; this holds that state for as
long as a test needs, to show that clients balancing with health checks give such a replica no calls."""
from __future__ import annotations

import runpy
import signal
import sys

from servers import grpc_engine

if __name__ == "__main__":
    grpc_engine.choose()  # as the server programs do, before grpc is imported

import asyncio  # noqa: E402

from grpc_health.v1 import health_pb2  # noqa: E402

from servers import serving  # noqa: E402

_add_health = serving.add_health


async def _switchable_health(server):  # type: ignore[no-untyped-def]
    servicer = await _add_health(server)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def switch(status: int) -> None:
        task = loop.create_task(servicer.set("", status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    for signum, status in ((signal.SIGUSR1, health_pb2.HealthCheckResponse.NOT_SERVING),
                           (signal.SIGUSR2, health_pb2.HealthCheckResponse.SERVING)):
        loop.add_signal_handler(signum, switch, status)
    return servicer


serving.add_health = _switchable_health

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
