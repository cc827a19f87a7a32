"""A gateway replica's store in a process of its own, for tests that kill, stop or cut off a replica.

    python -m tests.pg_replica URL USER KEY[,KEY...]

Opens a PostgresStore, claims each key (SBI-1001 → HDFC-2001, ₹1) and prints one JSON line per event on stdout:
{"ready": ..., "owner": N, "claims": {key: [kind, epoch]}}. Then it waits, holding its payments undecided:
SIGUSR1 makes it try to decide (commit) each of them and print {"decided": {key: "ok" | "LostOwnership"}}.
Every change of its liveness prints {"live": bool, "owner": N}. SIGKILL is what the tests are for.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys

from servers.gateway.store.pg_connection import PostgresOptions
from servers.gateway.store.postgres import PostgresStore
from servers.gateway.store.records import LostOwnership


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def main(url: str, user: str, keys: list[str]) -> None:
    store = PostgresStore(url, PostgresOptions(liveness_interval=0.2, liveness_timeout=2.0))
    store.on_liveness_change(lambda live: say(live=live, owner=store.owner_number))
    await store.start()
    claims = {key: await store.claim(user, key, "SBI-1001", "HDFC-2001", 100) for key in keys}
    say(ready=True, owner=store.owner_number, claims={k: [c.kind.value, c.payment.epoch] for k, c in claims.items()})

    async def decide_all() -> None:
        outcome = {}
        for key, claim in claims.items():
            try:
                await store.decide(claim.payment, True, "succeeded", "paid by the stopped replica", b"stale")
                outcome[key] = "ok"
            except LostOwnership:
                outcome[key] = "LostOwnership"
        say(decided=outcome)

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def spawn(coro_fn) -> None:
        task = loop.create_task(coro_fn())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGUSR1, spawn, decide_all)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",")))
