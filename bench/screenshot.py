"""Make the documents' pictures of the wallet from the running app, so they stay true.

    python -m bench.screenshot [--out-dir docs]

The demo configuration (`config/`: the users of the README's demo logins and their opening balances) is
copied into a temp dir with free ports; the banks and the gateway start there exactly as
`python run_all.py --servers-only` starts them (run_all.start_servers: certificates, processes, health
checks). The wallet runs headless under Textual's Pilot, built as the `wallet` command builds it. alice logs
in and makes three payments (one declined for insufficient funds, two paid): the screen, with the last
payment's toast, is `wallet.svg` (the README's picture). Then she turns offline mode on and pays once more: the
payment waits in Pending, and that screen is `wallet-offline.svg` (docs/design.md). A few seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import DataTable, Input

import run_all
from tests.harness import free_port
from tests.wallet_support import login, pay, table_rows, wait_for
from wallet_tui.app import WalletApp, make_app

REPO = Path(__file__).resolve().parent.parent
SIZE = (120, 28)
# (to, amount, from): alice's two accounts hold ₹50,000 and ₹15,000, so the first one is declined.
PAYMENTS = (("HDFC-2003", "20000", "HDFC-2002"), ("SBI-1002", "1200.50", "HDFC-2002"),
            ("HDFC-2001", "2500", "SBI-1001"))
QUEUED = ("HDFC-2001", "250", "SBI-1001")
PICTURES = ("wallet.svg", "wallet-offline.svg")


def start_demo_servers(root: Path) -> tuple[list[run_all.Server], int]:
    """The banks and gateway of the demo config under `root`, on free ports. Returns (servers, gateway port)."""
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    banks = json.loads((config / "banks.json").read_text())
    for bank in banks:
        banks[bank]["address"] = f"localhost:{free_port()}"
    (config / "banks.json").write_text(json.dumps(banks, indent=2))
    gateway_port = free_port()
    args = run_all.parse_args(["--config-dir", str(config), "--certs-dir", str(root / "certificates"),
                               "--data-dir", str(root / "data"), "--gateway-port", str(gateway_port),
                               "--servers-only", "--no-metrics"])
    return run_all.start_servers(args), gateway_port


async def _settle(pilot: Pilot) -> None:
    """Let the screen finish drawing: columns sized (DataTable does that on idle), no cursor caught mid-blink."""
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    for table in pilot.app.screen.query(DataTable):
        table.refresh(layout=True)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


async def _capture(app: WalletApp, out_dir: Path) -> None:
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await login(pilot, "alice", "alice123")
        for number, (to_account, amount, from_account) in enumerate(PAYMENTS, start=1):
            app.clear_notifications()  # only the last payment's toast stays on the picture
            await pay(pilot, to_account, amount, from_account)
            await wait_for(pilot, lambda: app.screen.query_one("#history", DataTable).row_count >= number,
                           timeout=20, message=f"payment {number} in the history")
        await app.workers.wait_for_complete()
        await wait_for(pilot, lambda: {"₹47,500.00", "₹13,799.50"} <= {cell for row in table_rows(app, "#balances")
                                                                      for cell in row},
                       message="the balances after the payments")
        await _settle(pilot)
        (out_dir / PICTURES[0]).write_text(app.export_screenshot(title="Strife wallet"), encoding="utf-8")

        app.clear_notifications()
        await pilot.press("ctrl+o")
        await pay(pilot, *QUEUED)
        await wait_for(pilot, lambda: app.screen.query_one("#pending", DataTable).row_count == 1,
                       message="the payment queued")
        await app.workers.wait_for_complete()
        await _settle(pilot)
        (out_dir / PICTURES[1]).write_text(app.export_screenshot(title="Strife wallet"), encoding="utf-8")


def make_screenshots(out_dir: Path) -> list[Path]:
    root = Path(tempfile.mkdtemp(prefix="strife-screenshot-"))
    servers: list[run_all.Server] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        servers, gateway_port = start_demo_servers(root)
        app = make_app(["--gateway", f"localhost:{gateway_port}", "--certs-dir", str(root / "certificates"),
                        "--data-dir", str(root / "data")])
        asyncio.run(_capture(app, out_dir))
    finally:
        run_all.stop_all(servers)
        shutil.rmtree(root, ignore_errors=True)
    return [out_dir / name for name in PICTURES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs",
                        help=f"where to write {' and '.join(PICTURES)} (default docs/)")
    args = parser.parse_args(argv)
    for path in make_screenshots(args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
