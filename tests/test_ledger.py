"""A bank's two-phase-commit rules (CONTRACT §6): first as unit tests of `servers.bank.ledger.Ledger` on a temp
SQLite file, then through a real bank process over mutual TLS (`cluster.bank_stub`)."""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers.bank.ledger import Ledger
from tests.harness import OPENING_TOTAL, Cluster

OPENING = {"SBI-1": 10_000, "SBI-2": 500, "SBI-3": 0}


def txn() -> str:
    return f"t-{uuid.uuid4()}"


@pytest.fixture
def make_ledger(tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []

    def factory(opening: dict[str, int] | None = None, path: Path | None = None, bank: str = "SBI") -> Ledger:
        ledger = Ledger(path or tmp_path / "bank_SBI.sqlite3", bank, lambda: dict(opening or OPENING))
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        ledger.close()


def state(ledger: Ledger) -> dict[str, tuple[int, int]]:
    """account → (balance, available), straight from the ledger."""
    out = {}
    for account in OPENING:
        b = ledger.balance(account)
        assert b is not None
        out[account] = (b.balance, b.available)
    return out


def txn_state(path: Path, txn_id: str) -> str | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT state FROM transactions WHERE txn_id = ?", (txn_id,)).fetchone()
    return None if row is None else row[0]


# ---- unit: servers.bank.ledger.Ledger -----------------------------------------------------------------------------
def test_prepare_is_idempotent_and_holds_the_amount_once(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 3_000).yes
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 3_000).yes
    assert state(ledger)["SBI-1"] == (10_000, 7_000)  # balance unchanged, available = balance - held


def test_commit_is_idempotent_and_applies_the_hold_once(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 3_000).yes
    assert ledger.commit(t).ok and ledger.commit(t).ok
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 3_000).yes  # a late duplicate Prepare changes nothing
    assert state(ledger)["SBI-1"] == (7_000, 7_000)


def test_abort_is_idempotent_and_releases_the_hold_once(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    other = txn()
    assert ledger.prepare(other, "SBI-1", "HDFC-9", 1_000).yes  # a second hold that must stay put
    t = txn()
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 3_000).yes
    assert ledger.abort(t).ok and ledger.abort(t).ok
    assert state(ledger)["SBI-1"] == (10_000, 9_000)


def test_abort_of_unknown_id_is_remembered_and_a_late_prepare_votes_no(make_ledger: Callable[..., Ledger],
                                                                       tmp_path: Path) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.abort(t).ok
    assert txn_state(tmp_path / "bank_SBI.sqlite3", t) == "aborted"
    vote = ledger.prepare(t, "SBI-1", "HDFC-9", 1_000)
    assert not vote.yes and vote.reason
    assert not ledger.prepare(t, "HDFC-9", "SBI-2", 1_000).yes  # the credit side too
    assert not ledger.commit(t).ok
    assert state(ledger) == {a: (v, v) for a, v in OPENING.items()}


def test_abort_of_unknown_id_is_remembered_across_a_reopen(make_ledger: Callable[..., Ledger]) -> None:
    t = txn()
    first = make_ledger()
    assert first.abort(t).ok
    first.close()
    assert not make_ledger().prepare(t, "SBI-1", "HDFC-9", 1_000).yes


def test_commit_of_unknown_or_aborted_id_fails(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    assert not ledger.commit(txn()).ok
    t = txn()
    assert ledger.prepare(t, "SBI-1", "SBI-2", 2_000).yes
    assert ledger.abort(t).ok
    assert not ledger.commit(t).ok
    assert state(ledger) == {a: (v, v) for a, v in OPENING.items()}


def test_abort_of_committed_id_fails_and_keeps_the_commit(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.prepare(t, "SBI-1", "SBI-2", 2_000).yes
    assert ledger.commit(t).ok
    assert not ledger.abort(t).ok
    assert ledger.commit(t).ok  # still committed
    s = state(ledger)
    assert s["SBI-1"] == (8_000, 8_000) and s["SBI-2"] == (2_500, 2_500)
    assert sum(b for b, _ in s.values()) == sum(OPENING.values())  # a same-bank payment conserves money


def test_prepare_needs_the_available_balance_not_the_balance(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    assert ledger.prepare(txn(), "SBI-1", "HDFC-9", 6_000).yes
    vote = ledger.prepare(txn(), "SBI-1", "HDFC-9", 6_000)  # balance 10 000 would cover it; available 4 000 not
    assert not vote.yes and "insufficient funds" in vote.reason
    assert ledger.prepare(txn(), "SBI-1", "HDFC-9", 4_000).yes  # exactly the available balance
    assert state(ledger)["SBI-1"] == (10_000, 0)
    assert not ledger.prepare(txn(), "SBI-1", "HDFC-9", 1).yes
    assert not ledger.prepare(txn(), "SBI-3", "HDFC-9", 1).yes  # an empty account


def test_concurrent_prepares_cannot_overdraw(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    ids = [txn() for _ in range(25)]
    votes: dict[str, bool] = {}
    start = threading.Barrier(len(ids))

    def prepare(t: str) -> None:
        start.wait()
        votes[t] = ledger.prepare(t, "SBI-1", "HDFC-9", 1_000).yes

    threads = [threading.Thread(target=prepare, args=(t,)) for t in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(votes) == 25 and sum(votes.values()) == 10  # ₹100 covers exactly ten holds of ₹10
    assert state(ledger)["SBI-1"] == (10_000, 0)
    for t, yes in votes.items():
        assert ledger.commit(t).ok == yes
    assert state(ledger)["SBI-1"] == (0, 0)


def test_prepare_reusing_a_txn_id_with_other_details_votes_no(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.prepare(t, "SBI-1", "HDFC-9", 1_000).yes
    for other in [("SBI-1", "HDFC-9", 1_001), ("SBI-2", "HDFC-9", 1_000), ("SBI-1", "HDFC-8", 1_000),
                  ("HDFC-9", "SBI-1", 1_000)]:
        vote = ledger.prepare(t, *other)
        assert not vote.yes and vote.reason, other
    assert state(ledger)["SBI-1"] == (10_000, 9_000) and state(ledger)["SBI-2"] == (500, 500)
    assert ledger.commit(t).ok
    assert not ledger.prepare(t, "SBI-1", "HDFC-9", 2_000).yes  # committed: other details still refused
    assert state(ledger)["SBI-1"] == (9_000, 9_000)


def test_prepare_of_a_credit_holds_nothing_and_commit_credits(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    t = txn()
    assert ledger.prepare(t, "HDFC-9", "SBI-3", 700).yes
    assert state(ledger)["SBI-3"] == (0, 0)  # nothing to spend before the commit
    assert ledger.commit(t).ok and ledger.commit(t).ok
    assert state(ledger)["SBI-3"] == (700, 700)


def test_prepare_for_an_unknown_account_votes_no(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    assert not ledger.prepare(txn(), "SBI-404", "HDFC-9", 1).yes
    assert not ledger.prepare(txn(), "HDFC-9", "SBI-404", 1).yes
    assert not ledger.prepare(txn(), "HDFC-8", "HDFC-9", 1).yes  # neither account is this bank's
    assert state(ledger) == {a: (v, v) for a, v in OPENING.items()}


def test_opening_balances_are_read_only_when_the_ledger_is_created(tmp_path: Path) -> None:
    path = tmp_path / "bank_SBI.sqlite3"
    reads: list[int] = []

    def opening() -> dict[str, int]:
        reads.append(1)
        return dict(OPENING)

    first = Ledger(path, "SBI", opening)
    t = txn()
    assert first.prepare(t, "SBI-1", "HDFC-9", 2_500).yes and first.commit(t).ok
    first.close()

    def changed_config() -> dict[str, int]:
        raise AssertionError("opening balances read again for an existing ledger")

    again = Ledger(path, "SBI", changed_config)
    try:
        assert len(reads) == 1
        assert again.balance("SBI-1").balance == 7_500  # type: ignore[union-attr]
    finally:
        again.close()
    with pytest.raises(ValueError):
        Ledger(path, "HDFC", opening)  # another bank's ledger file is refused, not reused


# ---- through a real bank over mutual TLS ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> Iterator[Cluster]:
    """Real banks (and a gateway, idle). Tests use fresh transaction ids and assert on the accounts they use."""
    cluster = Cluster(root=tmp_path_factory.mktemp("ledger"), certs_dir=certs_dir).start()
    yield cluster
    cluster.stop()


def prepare(stub: pbg.BankStub, t: str, from_account: str, to_account: str, amount: float) -> pb.Vote:
    return stub.Prepare(pb.PrepareRequest(transaction_id=t, from_account=from_account, to_account=to_account,
                                          amount=amount), timeout=5)


def commit(stub: pbg.BankStub, t: str) -> pb.Ack:
    return stub.Commit(pb.CommitRequest(transaction_id=t), timeout=5)


def abort(stub: pbg.BankStub, t: str) -> pb.Ack:
    return stub.Abort(pb.AbortRequest(transaction_id=t), timeout=5)


def test_real_bank_prepare_commit_abort_are_idempotent(banks: Cluster) -> None:
    sbi, hdfc = banks.bank_stub("SBI"), banks.bank_stub("HDFC")
    before = banks.accounts()
    t = txn()
    for stub in (sbi, hdfc, sbi, hdfc):  # every Prepare twice
        assert prepare(stub, t, "SBI-1002", "HDFC-2003", 12.5).vote
    assert banks.accounts()["SBI-1002"] == (before["SBI-1002"][0], before["SBI-1002"][1] + 1_250)  # once
    for stub in (sbi, hdfc, sbi, hdfc):
        assert commit(stub, t).success
    after = banks.accounts()
    assert after["SBI-1002"] == (before["SBI-1002"][0] - 1_250, before["SBI-1002"][1])
    assert after["HDFC-2003"] == (before["HDFC-2003"][0] + 1_250, before["HDFC-2003"][1])
    assert banks.total() == OPENING_TOTAL
    assert banks.txn_states("SBI")[t] == banks.txn_states("HDFC")[t] == "committed"
    for stub in (sbi, hdfc):
        assert not abort(stub, t).success  # Abort of a committed id fails
    assert banks.accounts() == after

    t2 = txn()
    assert prepare(sbi, t2, "SBI-1002", "HDFC-2003", 7).vote
    assert abort(sbi, t2).success and abort(sbi, t2).success
    assert not commit(sbi, t2).success  # Commit of an aborted id fails
    assert banks.accounts() == after and banks.txn_states("SBI")[t2] == "aborted"


def test_real_bank_remembers_abort_of_unknown_id_and_late_prepare_votes_no(banks: Cluster) -> None:
    sbi = banks.bank_stub("SBI")
    before = banks.accounts()
    t = txn()
    assert abort(sbi, t).success
    vote = prepare(sbi, t, "SBI-1002", "HDFC-2003", 5)
    assert not vote.vote and vote.reason
    assert not commit(sbi, t).success
    assert banks.txn_states("SBI")[t] == "aborted"
    assert banks.accounts() == before


def test_real_bank_commit_of_unknown_id_fails(banks: Cluster) -> None:
    before = banks.accounts()
    t = txn()
    for bank in ("SBI", "HDFC"):
        ack = commit(banks.bank_stub(bank), t)
        assert not ack.success and ack.message
        assert t not in banks.txn_states(bank)
    assert banks.accounts() == before


def test_real_bank_prepare_reusing_a_txn_id_with_other_details_votes_no(banks: Cluster) -> None:
    sbi = banks.bank_stub("SBI")
    before = banks.accounts()
    t = txn()
    assert prepare(sbi, t, "SBI-1002", "HDFC-2003", 3).vote
    assert not prepare(sbi, t, "SBI-1002", "HDFC-2003", 4).vote
    assert not prepare(sbi, t, "SBI-1002", "HDFC-2001", 3).vote
    assert banks.accounts()["SBI-1002"] == (before["SBI-1002"][0], before["SBI-1002"][1] + 300)
    assert abort(sbi, t).success
    assert banks.accounts() == before


def test_real_bank_holds_money_on_prepare_and_concurrent_prepares_cannot_overdraw(banks: Cluster) -> None:
    sbi = banks.bank_stub("SBI")
    ids = [txn() for _ in range(20)]
    votes: dict[str, bool] = {}
    start = threading.Barrier(len(ids))

    def run(t: str) -> None:
        start.wait()
        votes[t] = prepare(sbi, t, "SBI-1004", "HDFC-2001", 10).vote  # dave's account holds ₹100

    threads = [threading.Thread(target=run, args=(t,)) for t in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(votes) == 20 and sum(votes.values()) == 10
    assert banks.accounts()["SBI-1004"] == (10_000, 10_000)  # all of it held, none of it gone
    reply = sbi.GetBalance(pb.BankBalanceRequest(account_number="SBI-1004"), timeout=5)
    assert (reply.balance_paise, reply.available_paise) == (10_000, 0)  # the balance still includes holds
    assert reply.balance == 100.0 and reply.available == 0.0
    for t in ids:
        assert abort(sbi, t).success
    assert banks.accounts()["SBI-1004"] == (10_000, 0)
    assert banks.total() == OPENING_TOTAL


@pytest.mark.parametrize("amount", [0, -1, 0.001, float("nan"), float("inf"), 1e8])
def test_real_bank_refuses_a_bad_prepare_amount(banks: Cluster, amount: float) -> None:
    before = banks.accounts()
    t = txn()
    with pytest.raises(grpc.RpcError) as err:
        prepare(banks.bank_stub("SBI"), t, "SBI-1002", "HDFC-2003", amount)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert banks.accounts() == before and t not in banks.txn_states("SBI")


def test_real_bank_reads_opening_balances_only_when_its_ledger_is_created(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay(f"k-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 100).success
    before = cluster.accounts()
    assert before["SBI-1001"][0] == 490_000

    for bank in ("SBI", "HDFC"):  # change every opening balance and add an account
        path = cluster.config_dir / f"{bank}_accounts.json"
        opening = {account: 999_999.0 for account in json.loads(path.read_text())}
        opening[f"{bank}-7777"] = 123.0
        path.write_text(json.dumps(opening))
        cluster.restart(bank)

    assert cluster.accounts() == before
    assert cluster.total() == OPENING_TOTAL
    reply = cluster.bank_stub("SBI").GetBalance(pb.BankBalanceRequest(account_number="SBI-1001"), timeout=5)
    assert reply.balance_paise == 490_000
    with pytest.raises(grpc.RpcError) as err:
        cluster.bank_stub("SBI").GetBalance(pb.BankBalanceRequest(account_number="SBI-7777"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert alice.balances().accounts["SBI-1001"] == 4900.0
