"""Load held, short version of `python -m bench.soak`: a few seconds of concurrent payments against real
processes, then the servers' open file descriptors must be flat and every paisa accounted for."""
from __future__ import annotations

from typing import Callable

from bench.soak import SoakResult, report, run_soak
from tests.harness import OPENING_TOTAL, Cluster


def test_sustained_payments_leave_fds_flat_and_money_conserved(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(txn_timeout=5)
    result = run_soak(cluster, seconds=8, threads=8, warmup=2, interval=0.5)
    print(report(result))
    assert result.errors == []
    assert result.payments > 50 and result.outcomes["succeeded"] > 0
    assert len(result.samples) >= 12
    assert result.fds_flat(), {p: (result.growth("other_fds", p), s.sqlite_fds[p], s.threads[p])
                               for s in result.samples[-1:] for p in s.fds}
    assert result.money_conserved(), (result.final_accounts, result.moved)
    assert result.memory_flat()
    assert cluster.total() == OPENING_TOTAL
    assert result.nothing_left_behind()


def test_soak_verdicts_can_fail() -> None:
    """The verdicts are not vacuous: a descriptor leak or a lost paisa is reported as such."""
    from bench.soak import Sample
    result = SoakResult(seconds=8, threads=1)
    def samples(other: Callable[[int], int], sqlite: Callable[[int], int], threads: int = 20,
                rss_kb: Callable[[int], int] = lambda t: 100_000) -> list[Sample]:
        return [Sample(t, {"gateway": rss_kb(t)}, {"gateway": other(t) + sqlite(t)}, {"gateway": sqlite(t)},
                       {"gateway": threads}) for t in range(8)]

    result.samples = samples(lambda t: 30, lambda t: 10)
    assert result.fds_flat() and result.memory_flat()
    result.samples = samples(lambda t: 30 + (t if t >= 4 else 0), lambda t: 10)  # a socket per second
    assert not result.fds_flat()
    result.samples = samples(lambda t: 30, lambda t: 10 + 6 * t)  # connections beyond one per thread
    assert not result.fds_flat()
    result.samples = samples(lambda t: 30, lambda t: 9, rss_kb=lambda t: 100_000 + 10_000 * t)  # 10 MB/s
    assert not result.memory_flat()  # 40 MB over the second half: more than 16 MB + 4 connections' caches
    result.final_accounts = {a: (0, 0) for a in result.moved}
    assert not result.money_conserved()
