"""A damaged outbox file (cut short, garbage, records that are not payments) is kept aside byte for byte, every
whole record in it is salvaged, and the user is told. And every failed worker reaches the user: a login that
cannot open the outbox or fails unexpectedly gives the form back with a toast, and a poll that fails after its
report neither goes unreported nor starts a second chain of polls."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from textual.widgets import Button

from tests.harness import OPENING_TOTAL, PASSWORDS, Cluster
from tests.wallet_support import (FakeGateway, Toasts, fake_app, login, pending_count, screen_name, wait_for,
                                  wallet_argv)
from wallet_tui.app import make_app
from wallet_tui.core import WalletCore
from wallet_tui.outbox import CannotCancel, Outbox
from wallet_tui.settings import parse_args

SIZE = (120, 36)


def queue(directory: Path, amounts: list[int], *, claim_first: bool = False) -> list[str]:
    outbox = Outbox(directory, "alice")
    keys = [outbox.add("SBI-1001", "HDFC-2001", paise).key for paise in amounts]
    if claim_first:
        outbox.record_attempts(keys[:1])
    outbox.close()
    return keys


def corrupt_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def cut_inside(path: Path, key: str) -> bytes:
    """Truncate the file in the middle of the record of `key` (as a copy cut short would); the bytes left."""
    text = path.read_bytes()
    damaged = text[:text.index(key.encode()) + 10]
    path.write_bytes(damaged)
    return damaged


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad record"])
def test_damaged_outbox_is_kept_aside_and_every_whole_record_salvaged(tmp_path: Path, damage: str) -> None:
    keys = queue(tmp_path, [1_100, 2_200, 3_300], claim_first=True)
    hot = tmp_path / "alice.outbox.json"
    if damage == "truncated":
        damaged = cut_inside(hot, keys[2])
        kept = keys[:2]
    elif damage == "garbage":   # bytes that are not even UTF-8 over the middle record
        text = hot.read_bytes()
        start = text.index(keys[1].encode())
        damaged = text[:start] + b"\xff\xfe\x00garbage" + text[start + 60:]
        hot.write_bytes(damaged)
        kept = [keys[0], keys[2]]
    else:                       # whole JSON, but one record is not a payment
        data = json.loads(hot.read_text())
        del data["pending"][keys[1]]["to_account"]
        damaged = json.dumps(data).encode()
        hot.write_bytes(damaged)
        kept = [keys[0], keys[2]]

    outbox = Outbox(tmp_path, "alice")
    assert [e.key for e in outbox.pending()] == kept                 # the readable payments are still queued
    assert outbox.get(keys[0]).attempts == 1                         # … as they were: maybe sent, so …
    with pytest.raises(CannotCancel):                                # … still not cancellable
        outbox.cancel(keys[0])
    [repair] = outbox.take_repairs()
    assert outbox.take_repairs() == []                               # told once
    assert (repair.path, repair.recovered) == (hot, 2)
    assert corrupt_copies(hot) == [repair.copy] and repair.copy.read_bytes() == damaged   # byte for byte
    assert re.fullmatch(r"alice\.outbox\.json\.corrupt-\d{8}T\d{6}Z", repair.copy.name)
    json.loads(hot.read_text())                                      # the file is whole again
    outbox.add("SBI-1001", "HDFC-2001", 4_400)                       # and works
    outbox.close()
    assert len(Outbox(tmp_path, "alice").pending()) == 3 and len(corrupt_copies(hot)) == 1


def test_damaged_finished_file_keeps_its_whole_records(tmp_path: Path) -> None:
    keys = queue(tmp_path, [100, 200, 300])
    outbox = Outbox(tmp_path, "alice")
    for key in keys:
        outbox.finish(key, "succeeded", "paid")
    outbox.close()
    done = tmp_path / "alice.finished.json"
    cut_inside(done, keys[2])
    outbox = Outbox(tmp_path, "alice")
    assert sorted(e.key for e in outbox.finished()) == sorted(keys[:2]) and outbox.pending() == []
    [repair] = outbox.take_repairs()
    assert (repair.path, repair.recovered) == (done, 2) and repair.copy.exists()
    outbox.close()


def test_a_file_damaged_while_the_wallet_runs_is_repaired_and_reported_by_the_next_poll(tmp_path: Path) -> None:
    settings = parse_args(["--data-dir", str(tmp_path)])
    core = WalletCore(settings, FakeGateway())   # type: ignore[arg-type]
    core.login("alice", "alice123")
    core.set_offline_mode(True)
    keys = [core.submit("SBI-1001", "HDFC-2001", paise).key for paise in (500, 600)]
    assert core.poll().repairs == []
    cut_inside(core.outbox.path, keys[1])
    report = core.poll()
    assert [(r.path.name, r.recovered) for r in report.repairs] == [("alice.outbox.json", 1)]
    assert [row.key for row in core.pending_rows()] == keys[:1]
    core.close()


async def test_login_with_a_truncated_outbox_recovers_its_payments_sends_them_and_says_so(
        cluster: Cluster, tmp_path: Path) -> None:
    keys = queue(tmp_path / "wallet", [1_100, 2_200, 3_300])
    hot = tmp_path / "wallet" / "alice.outbox.json"
    damaged = cut_inside(hot, keys[2])
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        [copy] = corrupt_copies(hot)
        await wait_for(pilot, lambda: toasts.titled("Outbox repaired"), message="the repair toast")
        [toast] = toasts.titled("Outbox repaired")
        assert "2 queued payments could be read back" in toast and str(copy) in toast
        await wait_for(pilot, lambda: len(toasts.titled("Payment sent")) == 2 and pending_count(app) == 0,
                       message="the recovered payments sent")
    assert copy.read_bytes() == damaged
    paid = sorted((p.idempotency_key, p.amount_paise) for p in cluster.client("alice").history())
    assert paid == sorted(zip(keys[:2], (1_100, 2_200)))             # with the keys they were queued with
    assert cluster.balance("SBI-1001") == 500_000 - 3_300 and cluster.total() == OPENING_TOTAL


async def test_login_that_cannot_open_the_outbox_says_why_and_gives_the_form_back(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a file where the data directory should be")
    toasts = Toasts()
    app = fake_app(data_dir, FakeGateway())
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123", expect_main=False)
        await wait_for(pilot, lambda: toasts.titled("Outbox unavailable"), message="the outbox toast")
        assert "cannot open the outbox" in toasts.titled("Outbox unavailable")[0]
        error = str(app.screen.query_one("#login-error").render())
        assert "Not logged in" in error and "Not a directory" in error
        assert not app.screen.query_one("#login", Button).disabled and screen_name(app) == "LoginScreen"
        assert app.core.session is None

        data_dir.unlink()                                             # the user fixes it and tries again
        data_dir.mkdir()
        await login(pilot, "alice", "alice123")


class LoginBreaksGateway(FakeGateway):
    """A fault no real server gives on demand: login raises what no one expected."""

    def login(self, username: str, password: str):  # type: ignore[no-untyped-def]
        raise RuntimeError("unexpected reply from the gateway")


async def test_a_login_worker_that_fails_unexpectedly_reaches_the_user(tmp_path: Path) -> None:
    toasts = Toasts()
    app = fake_app(tmp_path, LoginBreaksGateway())
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123", expect_main=False)
        await wait_for(pilot, lambda: toasts.titled("Something went wrong"), message="the error toast")
        assert "unexpected reply from the gateway" in toasts.titled("Something went wrong")[0]
        assert "unexpected reply" in str(app.screen.query_one("#login-error").render())
        assert not app.screen.query_one("#login", Button).disabled


async def test_a_poll_that_fails_after_its_report_is_shown_and_polls_still_never_overlap(tmp_path: Path) -> None:
    gateway = FakeGateway(health_delay=0.05)
    toasts = Toasts()
    app = fake_app(tmp_path, gateway, poll=0.01)
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123")
        finished = app.core.outbox.finished_path
        finished.unlink(missing_ok=True)
        finished.mkdir()          # the history read after each poll now fails (EISDIR)
        polls = gateway.health_calls
        await wait_for(pilot, lambda: gateway.health_calls >= polls + 10, message="ten more polls")
        assert any("Is a directory" in t for t in toasts.titled("Something went wrong"))
        finished.rmdir()
    assert gateway.max_concurrent == 1

