"""Wallet measurements: outbox drain rate (payments queued offline, then the link restored) and start-up time."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.proxy_process import ProxyProcess
from tests.harness import PASSWORDS, Cluster
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GrpcGateway
from wallet_tui.settings import WalletSettings

REPO = Path(__file__).resolve().parent.parent


def drain_rate(cluster: Cluster, data_dir: Path, count: int) -> dict[str, float]:
    """Queue `count` payments while the wallet↔gateway link is cut, restore it, time the drain. The link runs
    through a proxy in a process of its own, so that relaying costs the measured wallet nothing."""
    proxy = ProxyProcess(cluster.gateway_port)
    settings = WalletSettings(gateway=proxy.address, certs_dir=cluster.certs_dir, data_dir=data_dir)
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
    try:
        core.login("alice", PASSWORDS["alice"])
        proxy.cut()
        core.set_offline_mode(True)  # queue on purpose: no send is attempted while the link is down
        keys = [core.submit("SBI-1001", "HDFC-2001", 1).key for _ in range(count)]
        before = cluster.balance("SBI-1001")
        proxy.restore()
        core.set_offline_mode(False)
        start = time.perf_counter()
        report = core.drain(force=True)
        elapsed = time.perf_counter() - start
        outbox = core.outbox
        assert outbox is not None
        succeeded = sum(1 for k in keys if (e := outbox.get(k)) is not None and e.status == "succeeded")
        moved = before - cluster.balance("SBI-1001")
        return {"drain": count / elapsed, "drain_count": float(count), "drain_succeeded": float(succeeded),
                "drain_exactly_once": float(succeeded == count and moved == count), "drain_sent": float(report.sent)}
    finally:
        core.close()
        proxy.close()


STARTUP_PROBE = """
import sys, time
from wallet_tui.app import make_app
async def main():
    app = make_app(sys.argv[1:])
    async with app.run_test(size=(120, 40)) as pilot:
        while app.screen.query("#username").first() is None:
            await pilot.pause()
        print("login-screen", flush=True)
import asyncio
asyncio.run(main())
"""


def startup_seconds(certs_dir: Path, data_dir: Path, runs: int = 3) -> float:
    """Wall time from starting a new wallet process to its login screen being mounted (headless)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STARTUP_PROBE, "--certs-dir", str(certs_dir), "--data-dir",
                              str(data_dir)], cwd=REPO, capture_output=True, text=True, timeout=60)
        if "login-screen" not in out.stdout:
            raise RuntimeError(f"wallet did not reach its login screen: {out.stderr[-1000:]}")
        best = min(best, time.perf_counter() - start)
    return best
