"""The chaos run's settings: what the wallets (bench/chaos.py) and the fault driver (bench/chaos_faults.py) both
read. A module of its own so that neither of those has to import the other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChaosConfig:
    payments: int = 300
    wallets: int = 4
    seed: int = 1
    gateways: int = 1                                 # gateway replicas on one store
    store: str = "sqlite"                             # or a PostgreSQL admin URL (bench/chaos_store.py)
    faults: tuple[str, ...] = ()                      # the kinds of fault to inject; () = every kind that applies
    seconds_budget: float = 600.0
    txn_timeout: float = 1.5                          # the gateway's prepare deadline
    pay_timeout: float = 4.0                          # the wallet's deadline on one payment call
    poll_interval: float = 0.25                       # the wallet's health check + drain (5 s in the TUI)
    chaos_seconds: float = 60.0                       # submissions are spread over this long, faults meanwhile
    fault_gap: tuple[float, float] = (0.1, 0.8)       # between two faults
    outage: tuple[float, float] = (0.2, 1.2)          # how long a process stays dead or a link cut
    store_outage: tuple[float, float] = (0.5, 2.5)    # how long a "restarted" PostgreSQL store is away
    max_amount_paise: int = 30_000                    # up to ₹300: dave (₹100) is often declined
