"""Property-based tests (hypothesis): random sequences of operations against the two durable owners of
exactly-once, each checked step by step against a small in-memory model.

- The bank participant (`servers.bank.ledger.Ledger`): any sequence of Prepare/Commit/Abort over a few transaction
  ids, with duplicates, reorderings, both banks' accounts, and restarts (close + reopen of the SQLite file)
  between steps. The model predicts every vote, ack and balance; invariants are read straight from disk.
- The gateway's key table (`servers.gateway.store.sqlite_payments.PaymentStore`): two gateway "processes" sharing one SQLite
  file and one owners directory, claiming, deciding, finishing and releasing keys of several users, crashing
  (the kernel drops a dead process's flock; the lock file stays) and restarting, taking over abandoned
  payments and sweeping. The model predicts every claim kind and every row of the table.

Each example gets a fresh temp directory. Settings are kept modest so the file runs in well under a minute.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servers.gateway.store.sqlite_payments import Claim, ClaimKind, LostOwnership, Payment, PaymentStore, Point, fingerprint
from servers.bank.ledger import Ledger
from servers.gateway.store.owners import Owner
from servers.money import bank_of
from servers.sqlite_store import SQLiteStore

MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])

# ---- the bank participant --------------------------------------------------------------------------------------
BANK = "SBI"
LEDGER_OPENING = {"SBI-1": 1_000, "SBI-2": 300, "SBI-3": 0}
# Accounts a Prepare may name: this bank's, one of this bank's that does not exist, the other bank's, junk.
PREPARE_ACCOUNTS = [*LEDGER_OPENING, "SBI-9", "HDFC-1", "HDFC-2", "not-an-account"]
TXN_IDS = [f"t{i}" for i in range(5)]


def _mine(account: str) -> bool:
    try:
        return bank_of(account) == BANK
    except ValueError:
        return False


@dataclass
class ModelTxn:
    state: str
    transfer: tuple[str, str, int] | None = None  # None: aborted before it was ever prepared
    debit: bool = False
    credit: bool = False


class BankParticipantMachine(RuleBasedStateMachine):
    """Ledger vs model. The model is deliberately naive: dictionaries and the rules of CONTRACT §6."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="strife-ledger-"))
        self.path = self.dir / f"bank_{BANK}.sqlite3"
        self.ledger = Ledger(self.path, BANK, lambda: dict(LEDGER_OPENING))
        self.balances = dict(LEDGER_OPENING)
        self.held = {a: 0 for a in LEDGER_OPENING}
        self.txns: dict[str, ModelTxn] = {}
        self.seen_states: dict[str, str] = {}  # the states read from disk after the previous step

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules --
    @rule(txn=st.sampled_from(TXN_IDS), from_account=st.sampled_from(PREPARE_ACCOUNTS),
          to_account=st.sampled_from(PREPARE_ACCOUNTS), amount=st.integers(1, 1_200))
    def prepare(self, txn: str, from_account: str, to_account: str, amount: int) -> None:
        expected = self._predict_prepare(txn, from_account, to_account, amount)
        vote = self.ledger.prepare(txn, from_account, to_account, amount)
        assert vote.yes == expected, (txn, from_account, to_account, amount, vote)
        event(f"prepare: {'yes' if vote.yes else vote.reason.split(' ')[0]}")
        assert vote.yes or vote.reason, "a NO vote must say why"

    def _predict_prepare(self, txn: str, f: str, t: str, amount: int) -> bool:
        debit, credit = _mine(f), _mine(t)
        if not (debit or credit):
            return False
        known = self.txns.get(txn)
        if known is not None:
            return known.state != "aborted" and known.transfer == (f, t, amount)
        if any(here and a not in self.balances for a, here in ((f, debit), (t, credit))):
            return False
        if debit:
            if self.balances[f] - self.held[f] < amount:
                return False
            self.held[f] += amount
        self.txns[txn] = ModelTxn("prepared", (f, t, amount), debit, credit)
        return True

    @rule(txn=st.sampled_from(TXN_IDS))
    def commit(self, txn: str) -> None:
        known = self.txns.get(txn)
        expected = known is not None and known.state in ("prepared", "committed")
        if known is not None and known.state == "prepared":
            f, t, amount = known.transfer  # type: ignore[misc]
            if known.debit:
                self.balances[f] -= amount
                self.held[f] -= amount
            if known.credit:
                self.balances[t] += amount
            known.state = "committed"
        outcome = self.ledger.commit(txn)
        assert outcome.ok == expected, (txn, known, outcome)
        event(f"commit: {outcome.message}")

    @rule(txn=st.sampled_from(TXN_IDS))
    def abort(self, txn: str) -> None:
        known = self.txns.get(txn)
        expected = known is None or known.state in ("prepared", "aborted")
        if known is None:
            self.txns[txn] = ModelTxn("aborted")
        elif known.state == "prepared":
            if known.debit:
                self.held[known.transfer[0]] -= known.transfer[2]  # type: ignore[index]
            known.state = "aborted"
        outcome = self.ledger.abort(txn)
        assert outcome.ok == expected, (txn, known, outcome)
        event(f"abort: {outcome.message}")

    @rule()
    def restart(self) -> None:
        """The bank process dies and comes back: everything must come from the SQLite file."""
        self.ledger.close()

        def opening_must_not_be_read() -> dict[str, int]:
            raise AssertionError("opening balances re-read for an existing ledger")

        self.ledger = Ledger(self.path, BANK, opening_must_not_be_read)

    # -- invariants, read from the ledger and from disk --
    @invariant()
    def balances_match_the_model(self) -> None:
        for account, balance in self.balances.items():
            got = self.ledger.balance(account)
            assert got is not None
            assert (got.balance, got.available) == (balance, balance - self.held[account]), account
        assert self.ledger.balance("SBI-9") is None

    @invariant()
    def disk_invariants_hold(self) -> None:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            accounts = {a: (b, h) for a, b, h in db.execute("SELECT account, balance, held FROM accounts")}
            rows = db.execute("SELECT txn_id, state, from_account, amount, debit_here, credit_here"
                              " FROM transactions").fetchall()
        db.close()
        assert set(accounts) == set(LEDGER_OPENING)
        prepared_debits = {a: 0 for a in accounts}
        moved = 0
        for _txn, state, from_account, amount, debit, credit in rows:
            if state == "prepared" and debit:
                prepared_debits[from_account] += amount
            if state == "committed":
                moved += amount * (credit - debit)  # a same-bank transfer (debit and credit here) moves nothing
        for account, (balance, held) in accounts.items():
            assert balance >= 0 and held >= 0, (account, balance, held)
            assert held == prepared_debits[account], (account, held, prepared_debits)
        # Money changes only by the cross-bank halves of committed transfers.
        assert sum(b for b, _ in accounts.values()) == sum(LEDGER_OPENING.values()) + moved
        allowed = {(None, "prepared"), (None, "aborted"), ("prepared", "committed"), ("prepared", "aborted")}
        states = {txn: state for txn, state, *_ in rows}
        for txn in set(states) | set(self.seen_states):
            before, after = self.seen_states.get(txn), states.get(txn)
            assert before == after or (before, after) in allowed, (txn, before, after)
            assert after == (self.txns[txn].state if txn in self.txns else None), (txn, after)
        self.seen_states = states


BankParticipantMachine.TestCase.settings = MACHINE_SETTINGS
test_bank_participant_matches_model = BankParticipantMachine.TestCase


# ---- the gateway's key table -----------------------------------------------------------------------------------
USERS = ["alice", "bob"]
KEYS = ["k1", "k2", "k3"]
TRANSFERS = [("SBI-1001", "HDFC-2001", 100), ("SBI-1001", "HDFC-2001", 200), ("SBI-1002", "HDFC-2001", 100)]
SLOTS = [0, 1]  # two gateway processes sharing the data directory


@dataclass
class GatewayProcess:
    """What one gateway process holds: its own connections to the shared file, and its liveness lock."""
    sqlite: SQLiteStore
    owner: Owner
    store: PaymentStore


@dataclass
class ModelKey:
    transfer: tuple[str, str, int]
    payment_id: int
    txn_id: str
    point: Point = Point.STARTED
    locked_by: str | None = None
    response: bytes | None = None


def _kill(owner: Owner) -> None:
    """What `kill -9` does to an owner: the kernel closes the fd (dropping the flock); the lock file stays."""
    os.close(owner._fd)  # noqa: SLF001 - simulating the kernel, not using the API
    owner._fd = -1  # noqa: SLF001


class KeyTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="strife-keys-"))
        self.procs: dict[int, GatewayProcess] = {slot: self._start() for slot in SLOTS}
        self.keys: dict[tuple[str, str], ModelKey] = {}
        self.handles: dict[tuple[str, str], Payment] = {}  # the Payment objects the "processes" were given
        self.dead_owners: set[str] = set()

    def _start(self) -> GatewayProcess:
        sqlite = SQLiteStore(self.dir / "gateway.sqlite3", "")
        owner = Owner(self.dir)
        return GatewayProcess(sqlite, owner, PaymentStore(sqlite, owner))

    def teardown(self) -> None:
        for proc in self.procs.values():
            proc.sqlite.close()
            proc.owner.release()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _live(self, owner_id: str | None) -> bool:
        return owner_id is not None and any(p.owner.id == owner_id for p in self.procs.values())

    # -- rules --
    @rule(slot=st.sampled_from(SLOTS), user=st.sampled_from(USERS), key=st.sampled_from(KEYS),
          transfer=st.sampled_from(TRANSFERS))
    def claim(self, slot: int, user: str, key: str, transfer: tuple[str, str, int]) -> None:
        self._claim(slot, user, key, transfer)

    @precondition(lambda self: self.keys)
    @rule(slot=st.sampled_from(SLOTS), data=st.data())
    def retry(self, slot: int, data: st.DataObject) -> None:
        """A client resending a key it used before, with the same payment (the common case)."""
        user, key = data.draw(st.sampled_from(sorted(self.keys)), label="key")
        self._claim(slot, user, key, self.keys[(user, key)].transfer)

    def _claim(self, slot: int, user: str, key: str, transfer: tuple[str, str, int]) -> None:
        proc = self.procs[slot]
        claim = proc.store.claim(user, key, *transfer)
        known = self.keys.get((user, key))
        event(f"claim: {claim.kind.value}")
        if known is None:
            assert claim.kind is ClaimKind.NEW, claim
            assert claim.payment is not None and claim.payment.recovery_point is Point.STARTED
            assert claim.payment.txn_id not in {k.txn_id for k in self.keys.values()}
            self.keys[(user, key)] = ModelKey(transfer, claim.payment.id, claim.payment.txn_id,
                                              locked_by=proc.owner.id)
            self.handles[(user, key)] = claim.payment
            return
        assert claim.payment is not None and claim.payment.txn_id == known.txn_id  # one payment per key
        if transfer != known.transfer:
            assert claim.kind is ClaimKind.MISMATCH, claim
        elif known.response is not None:
            assert claim.kind is ClaimKind.REPLAY, claim
            assert claim.payment.response == known.response  # the exact stored bytes
        elif self._live(known.locked_by):
            assert claim.kind is ClaimKind.IN_FLIGHT, claim
        else:
            # Undecided, and its owner dead or let go: this process takes it over.
            assert claim.kind is ClaimKind.RESUMED, claim
            assert claim.payment.recovery_point is Point.STARTED
            known.locked_by = proc.owner.id
            self.handles[(user, key)] = claim.payment

    def _owned_by_live(self, *points: Point) -> list[tuple[tuple[str, str], int]]:
        """(key, slot) of every handle whose payment is at one of `points` and locked by a live process."""
        slots = {p.owner.id: slot for slot, p in self.procs.items()}
        return [(ident, slots[k.locked_by]) for ident, k in sorted(self.keys.items())
                if ident in self.handles and k.point in points and k.locked_by in slots]

    # The "as owner" rules drive payments forward the way a gateway does; the plain ones let any process try
    # anything (which the store must refuse unless that process owns the payment).
    @precondition(lambda self: self._owned_by_live(Point.STARTED))
    @rule(data=st.data(), commit=st.booleans(), response=st.binary(min_size=0, max_size=40))
    def decide_as_owner(self, data: st.DataObject, commit: bool, response: bytes) -> None:
        ident, slot = data.draw(st.sampled_from(self._owned_by_live(Point.STARTED)), label="owned")
        self._decide(slot, ident, commit, response)

    @precondition(lambda self: self._owned_by_live(Point.COMMIT_DECIDED, Point.ABORT_DECIDED))
    @rule(data=st.data())
    def finish_as_owner(self, data: st.DataObject) -> None:
        ident, slot = data.draw(st.sampled_from(self._owned_by_live(Point.COMMIT_DECIDED, Point.ABORT_DECIDED)),
                                label="owned")
        self._finish(slot, ident)

    @precondition(lambda self: self.handles)
    @rule(slot=st.sampled_from(SLOTS), data=st.data(), commit=st.booleans(),
          response=st.binary(min_size=0, max_size=40))
    def decide(self, slot: int, data: st.DataObject, commit: bool, response: bytes) -> None:
        self._decide(slot, data.draw(st.sampled_from(sorted(self.handles)), label="key"), commit, response)

    def _decide(self, slot: int, ident: tuple[str, str], commit: bool, response: bytes) -> None:
        proc, known = self.procs[slot], self.keys[ident]
        allowed = known.locked_by == proc.owner.id and known.point is Point.STARTED
        try:
            proc.store.decide(self.handles[ident], commit=commit, status="succeeded" if commit else "declined",
                              message="m", response=response)
        except LostOwnership:
            assert not allowed, (ident, known)
            return
        assert allowed, f"{ident} decided by a process that does not own it: {known}"
        known.point = Point.COMMIT_DECIDED if commit else Point.ABORT_DECIDED
        known.response = response

    @precondition(lambda self: self.handles)
    @rule(slot=st.sampled_from(SLOTS), data=st.data())
    def finish(self, slot: int, data: st.DataObject) -> None:
        self._finish(slot, data.draw(st.sampled_from(sorted(self.handles)), label="key"))

    def _finish(self, slot: int, ident: tuple[str, str]) -> None:
        proc, known = self.procs[slot], self.keys[ident]
        proc.store.finish(self.handles[ident])
        if known.locked_by == proc.owner.id and known.point in (Point.COMMIT_DECIDED, Point.ABORT_DECIDED):
            known.point, known.locked_by = Point.FINISHED, None

    @precondition(lambda self: self.handles)
    @rule(slot=st.sampled_from(SLOTS), data=st.data())
    def release(self, slot: int, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(sorted(self.handles)), label="key")
        proc, known = self.procs[slot], self.keys[ident]
        proc.store.release(self.handles[ident])
        if known.locked_by == proc.owner.id:
            known.locked_by = None

    @rule(slot=st.sampled_from(SLOTS), how=st.sampled_from(["kill", "graceful"]))
    def crash_and_restart(self, slot: int, how: str) -> None:
        """A gateway process dies (kill -9, or a clean exit) and a new one starts on the same data dir."""
        proc = self.procs[slot]
        if how == "kill":
            _kill(proc.owner)
        else:
            proc.owner.release()
        proc.sqlite.close()
        self.dead_owners.add(proc.owner.id)
        self.procs[slot] = self._start()

    @precondition(lambda self: any(k.point is not Point.FINISHED for k in self.keys.values()))
    @rule(slot=st.sampled_from(SLOTS))
    def take_over_abandoned(self, slot: int) -> None:
        proc = self.procs[slot]
        taken = proc.store.take_over_abandoned()
        expected = {k.payment_id for k in self.keys.values()
                    if k.point is not Point.FINISHED and k.locked_by != proc.owner.id and not self._live(k.locked_by)}
        assert {p.id for p in taken} == expected
        event(f"take_over: {'some' if taken else 'none'}")
        assert len(taken) == len(expected)
        for payment in taken:
            ident = (payment.username, payment.idem_key)
            known = self.keys[ident]
            assert payment.recovery_point is known.point and payment.response == known.response
            known.locked_by = proc.owner.id
            self.handles[ident] = payment

    @rule(slot=st.sampled_from(SLOTS), expired=st.booleans())
    def sweep(self, slot: int, expired: bool) -> None:
        swept = self.procs[slot].store.sweep(0.0 if expired else 3600.0)
        gone = [ident for ident, k in self.keys.items() if expired and k.point is Point.FINISHED]
        assert swept == len(gone)
        for ident in gone:
            del self.keys[ident]
            self.handles.pop(ident, None)

    # -- invariants --
    @invariant()
    def table_matches_model(self) -> None:
        with sqlite3.connect(f"file:{self.dir / 'gateway.sqlite3'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT k.username, k.idem_key, k.fingerprint, k.payment_id, p.txn_id,"
                              " k.recovery_point, k.locked_by, k.response FROM idempotency_keys k"
                              " JOIN payments p ON p.id = k.payment_id").fetchall()
            payments = db.execute("SELECT count(*), count(DISTINCT txn_id) FROM payments").fetchone()
        db.close()
        table = {(u, k): rest for u, k, *rest in rows}
        assert set(table) == set(self.keys)
        for ident, known in self.keys.items():
            fp, payment_id, txn_id, point, locked_by, response = table[ident]
            assert fp == fingerprint(*known.transfer)
            assert (payment_id, txn_id, point, locked_by, response) == (
                known.payment_id, known.txn_id, known.point.value, known.locked_by, known.response), ident
            # A finished payment belongs to nobody; a decided one always carries the client's response.
            assert (point == "finished") <= (locked_by is None)
            assert (point != "started") == (response is not None)
        assert payments[0] == payments[1]  # every payment ever executed has its own transaction id

    @invariant()
    def no_live_process_is_told_a_dead_owner_is_alive(self) -> None:
        for proc in self.procs.values():
            for owner_id in self.dead_owners:
                assert not proc.owner.is_alive(owner_id)
            for other in self.procs.values():
                assert proc.owner.is_alive(other.owner.id)


KeyTableMachine.TestCase.settings = MACHINE_SETTINGS
test_key_table_matches_model = KeyTableMachine.TestCase


def test_model_machines_are_not_vacuous() -> None:
    """A guard for the machines above: the model really can disagree with the code (so the tests can fail)."""
    machine = BankParticipantMachine()
    try:
        assert machine.ledger.prepare("t0", "SBI-1", "HDFC-1", 400).yes  # the model was not told
        with pytest.raises(AssertionError):
            machine.balances_match_the_model()
        with pytest.raises(AssertionError):
            machine.disk_invariants_hold()
        machine.held["SBI-1"] += 400
        machine.txns["t0"] = ModelTxn("prepared", ("SBI-1", "HDFC-1", 400), debit=True)
        machine.balances_match_the_model()
        machine.disk_invariants_hold()
        machine.balances["SBI-1"] += 1  # a model that is wrong by one paisa must be caught
        with pytest.raises(AssertionError):
            machine.balances_match_the_model()
    finally:
        machine.teardown()


@given(callers=st.lists(st.tuples(st.sampled_from(SLOTS), st.sampled_from(TRANSFERS)), min_size=2, max_size=8))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_concurrent_claims_of_one_key_make_exactly_one_owner(callers: list[tuple[int, tuple[str, str, int]]]
                                                             ) -> None:
    """Many requests with one key, at the same instant, from two processes: exactly one executes it."""
    directory = Path(tempfile.mkdtemp(prefix="strife-race-"))
    procs = []
    try:
        for _ in SLOTS:
            sqlite = SQLiteStore(directory / "gateway.sqlite3", "")
            owner = Owner(directory)
            procs.append(GatewayProcess(sqlite, owner, PaymentStore(sqlite, owner)))
        barrier = threading.Barrier(len(callers))
        claims: list[tuple[tuple[str, str, int], Claim]] = []
        lock = threading.Lock()

        def call(slot: int, transfer: tuple[str, str, int]) -> None:
            barrier.wait(10)
            claim = procs[slot].store.claim("alice", "same-key", *transfer)
            with lock:
                claims.append((transfer, claim))

        threads = [threading.Thread(target=call, args=c) for c in callers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(claims) == len(callers)
        winners = [(t, c) for t, c in claims if c.kind is ClaimKind.NEW]
        assert len(winners) == 1, claims
        winner_transfer, winner = winners[0]
        assert winner.payment is not None
        for transfer, claim in claims:
            assert claim.payment is not None and claim.payment.txn_id == winner.payment.txn_id
            if claim is not winner:
                expected = ClaimKind.IN_FLIGHT if transfer == winner_transfer else ClaimKind.MISMATCH
                assert claim.kind is expected, (transfer, claim)
    finally:
        for proc in procs:
            proc.sqlite.close()
            proc.owner.release()
        shutil.rmtree(directory, ignore_errors=True)
