"""The chaos run's verdicts, read after the run: the banks' ledgers, the gateways' store (SQLite or PostgreSQL,
read directly by tests/store_view.py, not by the gateway's own code), and every wallet's outbox. Each check names
an invariant and says what it found.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from tests.harness import OPENING, OPENING_TOTAL, Cluster
from wallet_tui.outbox import Outbox

OPENING_PAISE = {a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()}


def bank_of(account: str) -> str:
    return account.split("-", 1)[0]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class WalletView(Protocol):
    user: str
    keys: list[str]      # every idempotency key the wallet submitted

    @property
    def outbox(self) -> Outbox: ...


def check_invariants(cluster: Cluster, wallets: list[WalletView]) -> list[Check]:
    checks: list[Check] = []

    def check(name: str, problems: list[str], good: str) -> None:
        checks.append(Check(name, not problems, good if not problems else
                            f"{len(problems)} problem(s): " + "; ".join(problems[:5])))

    accounts = cluster.accounts()
    states = {bank: cluster.txn_states(bank) for bank in OPENING}
    rows = cluster.view.payments()
    total = sum(b for b, _ in accounts.values())
    check("money conserved", [] if total == OPENING_TOTAL else [f"total {total} != opening {OPENING_TOTAL}"],
          f"sum of balances {total} paise == opening {OPENING_TOTAL}")
    check("no negative balance", [f"{a}: {b}" for a, (b, _) in accounts.items() if b < 0],
          f"min balance {min(b for b, _ in accounts.values())} paise")
    prepared = [f"{bank}:{t}" for bank, s in states.items() for t, st in s.items() if st == "prepared"]
    held = [f"{a} holds {h}" for a, (_, h) in accounts.items() if h]
    check("no hold left", held + [f"prepared {p}" for p in prepared], "holds 0, no 'prepared' txn at any bank")

    # The wallets: every key submitted has exactly one final outcome, nothing is pending.
    outcome: dict[tuple[str, str], tuple[str, str]] = {}
    problems: list[str] = []
    for w in wallets:
        problems += [f"{w.user} {e.key} still pending" for e in w.outbox.pending()]
        seen = Counter()
        for e in w.outbox.finished(10_000):
            seen[e.key] += 1
            outcome[(w.user, e.key)] = (e.status, e.transaction_id)
        problems += [f"{w.user} {k}: {seen[k]} outcomes" for k in w.keys if seen[k] != 1]
        problems += [f"{w.user} {k}: unknown key in outbox" for k in set(seen) - set(w.keys)]
        problems += [f"{w.user} {k}: {outcome[(w.user, k)][0]}" for k in w.keys
                     if (w.user, k) in outcome and outcome[(w.user, k)][0] not in ("succeeded", "declined", "failed")]
    keys = sum(len(w.keys) for w in wallets)
    check("one final outcome per key", problems, f"{keys} keys, each final exactly once in its wallet's outbox")

    # The gateway: one payment per (user, key), none unfinished, and the same outcome the wallet recorded.
    per_key = Counter((u, k) for u, k, *_ in rows)
    problems = [f"{u} {k}: {n} payments" for (u, k), n in per_key.items() if n != 1]
    problems += [f"{u} {k}: no payment at the gateway (wallet: {outcome.get((u, k), ('?',))[0]})"
                 for w in wallets for u, k in ((w.user, k) for k in w.keys) if (u, k) not in per_key]
    problems += [f"{u} {k}: not a wallet key" for u, k in per_key if (u, k) not in outcome]
    unfinished = cluster.unfinished_payments()
    processing = [r[2] for r in rows if r[6] == "processing"]
    problems += [f"{unfinished} unfinished keys"] if unfinished else []
    problems += [f"{len(processing)} payments still processing"] if processing else []
    check("one gateway payment per key", problems, f"{len(rows)} payments for {keys} keys, none unfinished")
    mismatch = [f"{u} {k}: wallet {outcome[(u, k)]} gateway {(s, t)}" for u, k, t, _f, _t, _a, s in rows
                if (u, k) in outcome and outcome[(u, k)] != (s, t)]
    check("wallet outcome == gateway outcome", mismatch, "status and transaction id agree for every key")

    # The banks: a succeeded key is committed at the sender's and the receiver's bank, the rest nowhere.
    expected = dict(OPENING_PAISE)
    problems, stray = [], []
    committed_by_bank = {bank: {t for t, st in s.items() if st == "committed"} for bank, s in states.items()}
    succeeded_by_bank: dict[str, set[str]] = {bank: set() for bank in OPENING}
    for u, k, txn, src, dst, amount, status in rows:
        banks = {bank_of(src), bank_of(dst)}
        if status == "succeeded":
            problems += [f"{txn} ({u} {k}) at {b}: {states[b].get(txn)}" for b in banks
                         if states[b].get(txn) != "committed"]
            for b in banks:
                succeeded_by_bank[b].add(txn)
            expected[src] -= amount
            expected[dst] += amount
        else:
            problems += [f"{status} {txn} ({u} {k}) committed at {b}" for b in OPENING
                         if states[b].get(txn) == "committed"]
    for bank in OPENING:
        stray += [f"{bank} committed {t} that no succeeded payment explains"
                  for t in committed_by_bank[bank] - succeeded_by_bank[bank]]
    succeeded = sum(1 for r in rows if r[6] == "succeeded")
    check("succeeded ⇔ committed", problems + stray,
          f"{succeeded} succeeded txns committed at both banks (once if same-bank), the others committed nowhere")
    wrong = [f"{a}: {accounts[a][0]} != {v}" for a, v in expected.items() if accounts.get(a, (None,))[0] != v]
    check("balances = opening ± succeeded", wrong,
          f"all {len(expected)} balances equal opening ± the succeeded payments in the gateway's table")

    # End to end, the gateway's table aside: what the wallets were told is what the banks did.
    told: dict[str, tuple[str, str, int]] = {}
    for w in wallets:
        told.update({e.transaction_id: (e.from_account, e.to_account, e.amount_paise)
                     for e in w.outbox.finished(10_000) if e.status == "succeeded"})
    problems = [f"told succeeded, {txn} at {b}: {states[b].get(txn)}" for txn, (src, dst, _) in told.items()
                for b in {bank_of(src), bank_of(dst)} if states[b].get(txn) != "committed"]
    problems += [f"{bank} committed {t}, no wallet was told it succeeded" for bank in OPENING
                 for t in committed_by_bank[bank] if t not in told]
    expected = dict(OPENING_PAISE)
    for src, dst, amount in told.values():
        expected[src] -= amount
        expected[dst] += amount
    problems += [f"{a}: {accounts[a][0]} != {v} (opening ± what the wallets were told)"
                 for a, v in expected.items() if accounts.get(a, (None,))[0] != v]
    check("told succeeded ⇔ committed", problems,
          f"{len(told)} payments the wallets were told succeeded are committed at both banks, no other commit, "
          "balances = opening ± them")
    crashes = [f"{name}: {proc.log().count('Traceback')} traceback(s)" for name, proc in cluster.procs.items()
               if "Traceback" in proc.log()]
    check("no unhandled exception", crashes, "no traceback in any server's log (one file per server, all restarts)")
    return checks
