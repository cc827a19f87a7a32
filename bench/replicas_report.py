"""bench.replicas' report: medians with ranges over interleaved rounds, the targets, where the CPU goes, the soak,
the cost of a commit and a round trip on each store, and a paper estimate for N replicas on N machines."""
from __future__ import annotations

import os
import statistics
from typing import Any

ROLES = ("client", "gateways", "SBI", "HDFC", "postgres")
# A gateway's or a bank's work runs on one event loop (one Python thread holding the GIL): on a machine of its
# own it gets about one core, whatever the machine has. PostgreSQL runs a process per session: all its cores.
PROCESS_CORES = 1.0


def _med(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration: each measure's median [range]; per target: the median [range] of the rounds' ratios;
    per configuration and window: each role's median CPU ms per payment."""
    configs = list(rounds[0])
    out: dict[str, Any] = {"rates": {}, "cpu_ms": {}, "cpu_busy": {}, "machine_busy": {}, "ratios": {}}
    for c in configs:
        measures = [k for k, v in rounds[0][c].items() if isinstance(v, float)]
        out["rates"][c] = {m: _med([r[c][m] for r in rounds]) for m in measures}
        out["cpu_ms"][c] = {w: {role: statistics.median(r[c]["cpu_ms"][w].get(role, 0.0) for r in rounds)
                                for role in ROLES if role in rounds[0][c]["cpu_ms"][w]}
                            for w in rounds[0][c]["cpu_ms"]}
        for busy in ("cpu_busy", "machine_busy"):
            out[busy][c] = {w: statistics.median(r[c][busy][w] for r in rounds) for w in rounds[0][c][busy]}
    pg = [c for c in configs if c != "sqlite"]
    ratios: dict[str, list[float]] = {}

    def ratio(r: dict[str, dict[str, Any]], a: str, measure: str, b: str, of: str) -> None:
        ratios.setdefault(f"{a} {measure} / {b} {of}", []).append(r[a][measure] / r[b][of])

    for r in rounds:
        ratio(r, pg[0], "sequential", "sqlite", "sequential")
        ratio(r, pg[0], "concurrent", "sqlite", "concurrent")
        for c in configs:
            ratio(r, c, "replay", c, "sequential")
        for c in pg[1:]:
            ratio(r, c, "concurrent", pg[0], "concurrent")
    out["ratios"] = {name: _med(values) for name, values in ratios.items()}
    out["trouble"] = [f"round {i + 1}, {c}: " + "; ".join(_trouble(v)) for i, r in enumerate(rounds)
                      for c, v in r.items() if _trouble(v)]
    return out


def _trouble(measured: dict[str, Any]) -> list[str]:
    """Calls refused in a configuration's windows, and its gateways' lost store sessions and ERROR lines."""
    refused = [f"calls refused {measured['errors']}"] if measured.get("errors") else []
    return refused + measured.get("gateway_trouble", [])


def round_line(row: dict[str, dict[str, Any]]) -> str:
    line = "; ".join(f"{c} {v['sequential']:.0f} / {v['concurrent']:.0f} / {v['replay']:.0f}/s"
                     for c, v in row.items()) + " (sequential / concurrent / replay)"
    trouble = [f"{c}: refused {v['errors']}" for c, v in row.items() if v.get("errors")]
    trouble += [f"{c}: {len(v['gateway_trouble'])} trouble line(s) from its gateways" for c, v in row.items()
                if v.get("gateway_trouble")]
    return line + (f" — {'; '.join(trouble)}" if trouble else "")


def _span(m: dict[str, float], fmt: str = "{:.0f}") -> str:
    if m["n"] == 1:
        return fmt.format(m["median"])
    return f"{fmt.format(m['median'])} [{fmt.format(m['min'])}–{fmt.format(m['max'])}]"


def _verdict(ratio: dict[str, float], target: float) -> str:
    if ratio["min"] >= target:
        return "met in every round"
    if ratio["median"] >= target:
        return "met by the median, not in every round"
    return "NOT met"


def targets(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured median [range], verdict), for the targets the measured configurations allow."""
    ratios = summary["ratios"]
    pg = [c for c in summary["rates"] if c != "sqlite"]
    wanted = [(f"PostgreSQL sequential ≥ 0.7× SQLite's ({pg[0]})", f"{pg[0]} sequential / sqlite sequential", 0.7)]
    wanted += [(f"replay ≥ 3× sequential ({c})", f"{c} replay / {c} sequential", 3.0) for c in pg]
    wanted += [(f"concurrent: {c} ≥ {pg[0]}", f"{c} concurrent / {pg[0]} concurrent", 1.0) for c in pg[1:2]]
    return [(label, _span(ratios[name], "{:.2f}x"), _verdict(ratios[name], target)) for label, name, target in wanted]


def paper_estimate(cpu_ms: dict[str, float], pg_cores: float, machines: range = range(1, 7)
                   ) -> list[tuple[int, float, str]]:
    """Payments/s that N gateway replicas on N machines would carry, from the CPU per payment measured on one
    machine: each replica and each bank on a machine of its own (one core each: one event loop), PostgreSQL
    on one of `pg_cores` cores, the clients elsewhere; (N, rate, bottleneck)."""
    per_gateway = PROCESS_CORES * 1000 / cpu_ms["gateways"]
    per_bank = PROCESS_CORES * 1000 / max(cpu_ms["SBI"], cpu_ms["HDFC"])  # every payment visits both banks
    postgres = pg_cores * 1000 / cpu_ms["postgres"] if cpu_ms.get("postgres") else float("inf")
    out = []
    for n in machines:
        limits = {f"{n} gateway replica{'s' * (n > 1)} (CPU)": n * per_gateway, "the busier bank (CPU)": per_bank,
                  f"PostgreSQL on {pg_cores:g} cores (CPU)": postgres}
        bottleneck = min(limits, key=limits.__getitem__)
        out.append((n, limits[bottleneck], bottleneck))
    return out


def print_report(summary: dict[str, Any], soak: dict[str, Any] | None, why: dict[str, Any], seconds: float,
                 rounds: int) -> None:
    rates = summary["rates"]
    print(f"\nPostgreSQL store and gateway replicas: {rounds} interleaved round(s), {seconds:g} s per measure;"
          " median [min–max] over the rounds")
    header = ("configuration", "sequential /s", "concurrent /s (16 thr.)", "replay /s", "seq. p50 / p99 ms")
    print(f"{header[0]:<14}{header[1]:>18}{header[2]:>26}{header[3]:>20}{header[4]:>20}")
    for c, r in rates.items():
        print(f"{c:<14}{_span(r['sequential']):>18}{_span(r['concurrent']):>26}{_span(r['replay']):>20}"
              f"{r['sequential_p50_ms']['median']:>13.1f} / {r['sequential_p99_ms']['median']:.1f}")
    if summary["trouble"]:
        print("calls refused, and what the gateways logged: lost store sessions, ERROR lines:")
        for line in summary["trouble"]:
            print(f"  {line}")
    print("\ntargets (each: the median [range] of the rounds' own ratios)")
    for label, measured, verdict in targets(summary):
        print(f"  {label:<48}{measured:>24}  {verdict}")
    for name, ratio in summary["ratios"].items():
        if "concurrent" in name and not name.startswith("pg×2"):
            print(f"  {name:<48}{_span(ratio, '{:.2f}x'):>24}")

    print("\nwhere the CPU goes: ms of CPU per payment by process (median over rounds); how busy the machine's cores"
          " were with this cluster and its client, and with everything (other people's work included)")
    for window in ("concurrent", "sequential"):
        print(f"  {window} window:")
        print(f"    {'configuration':<14}" + "".join(f"{role:>10}" for role in ROLES)
              + f"{'total':>10}{'ours busy':>11}{'all busy':>10}")
        for c, by_window in summary["cpu_ms"].items():
            cpu = by_window[window]
            print(f"    {c:<14}" + "".join(f"{cpu[role]:>10.2f}" if role in cpu else f"{'-':>10}" for role in ROLES)
                  + f"{sum(cpu.values()):>10.2f}{summary['cpu_busy'][c][window]:>11.0%}"
                  f"{summary['machine_busy'][c][window]:>10.0%}")

    print("  if this cluster had both cores to itself, the concurrent CPU per payment would allow at most: "
          + ", ".join(f"{c} {(os.cpu_count() or 1) * 1000 / sum(w['concurrent'].values()):.0f}/s"
                      for c, w in summary["cpu_ms"].items()))

    print_estimate(summary)

    if soak is not None:
        print(f"\nsoak: {soak['payments']:,} payments by 16 threads through 2 replicas on PostgreSQL at"
              f" {soak['rate']:.0f}/s (p99 {soak['p99_ms']:.0f} ms), {len(soak['samples'])} samples; money conserved")
        print("  (before: after one warm-up payment each; first/last/max: the samples under load, the last taken when"
              " every payment had been answered)")
        for name in soak["sessions"]:
            s, m = soak["sessions"][name], soak["rss_mb"][name]
            print(f"  {name:<10} PostgreSQL sessions before {s['before']:.0f}, first/last/max {s['first']:.0f} /"
                  f" {s['last']:.0f} / {s['max']:.0f};  RSS MB before {m['before']:.1f}, first/last/max"
                  f" {m['first']:.1f} / {m['last']:.1f} / {m['max']:.1f} (last − first {m['last'] - m['first']:+.1f})")
        print(f"  sessions on the database from neither replica: at most {soak['other_sessions_max']}")
        idle = soak["idle_cpu_ms_per_s"]
        print(f"  with no payments ({soak['idle_seconds']:g} s before the load: completer passes, liveness checks),"
              " ms of CPU per second: " + ", ".join(f"{role} {idle[role]:.1f}" for role in ROLES if role in idle)
              + f"; the whole machine {idle['machine']:.0f}")
        for line in ([f"calls refused: {soak['errors']}"] if soak["errors"] else []) + soak["gateway_trouble"]:
            print(f"  {line}")
        print("  PostgreSQL's counts for the soak's database over its whole life, per payment (background included): "
              + ", ".join(f"{k} {v:.2f}" for k, v in soak["per_payment"].items()))

    print_why(summary, why)


def print_estimate(summary: dict[str, Any], pg_cores: float = 2) -> None:
    """From the CPU per concurrent payment of the fewest and of the most replicas measured: with more replicas
    each batches less (its frames to the banks, its finishes carry fewer payments), so each costs more."""
    pg = [c for c in summary["cpu_ms"] if c != "sqlite"]
    if not pg:
        return
    print("\npaper estimate: N replicas on N machines — each replica and each bank on a machine of its own with one"
          f" core each (one event loop), PostgreSQL on {pg_cores:g} cores of its own, the clients elsewhere and"
          " enough of them; from the CPU per concurrent payment measured here")
    estimates = {}
    for c in dict.fromkeys((pg[0], pg[-1])):
        cpu = summary["cpu_ms"][c]["concurrent"]
        print(f"  {c}: gateway {cpu['gateways']:.2f} ms, banks {cpu['SBI']:.2f} / {cpu['HDFC']:.2f} ms, PostgreSQL"
              f" {cpu['postgres']:.2f} ms per payment")
        estimates[c] = paper_estimate(cpu, pg_cores)
    _, *more = estimates
    for row in zip(*estimates.values()):
        (n, rate, bottleneck), *others = row
        print(f"  N = {n}: ≈ {rate:,.0f}/s, bound by {bottleneck}" + "".join(
            f"   [with {c}'s CPU (each replica batching less): ≈ {r:,.0f}/s, bound by {b}]"
            for c, (_, r, b) in zip(more, others)))


def print_why(summary: dict[str, Any], why: dict[str, Any]) -> None:
    commits, stores = why["commit_ms"], why["stores_ms"]
    print("\nwhat the store's work costs, PostgreSQL on this server vs SQLite as Strife sets it up, sampled in turn"
          " (medians, ms)")
    print(f"  {'':<52}{'PostgreSQL':>12}{'SQLite':>10}")
    print(f"  {'a round trip doing nothing (SELECT 1)':<52}{why['round_trip_ms']:>12.3f}{'-':>10}")
    print(f"  {'  the same after 3 ms idle':<52}{why['round_trip_after_idle_ms']:>12.3f}{'-':>10}")
    for shape, label in (("flushed tight", "a durable commit, one after another"),
                         ("flushed after idle", "a durable commit after 3 ms idle"),
                         ("unflushed tight", "  the same without the flush, one after another"),
                         ("unflushed after idle", "  the same without the flush, after 3 ms idle")):
        print(f"  {label:<52}{commits['postgres'][shape]:>12.3f}{commits['sqlite'][shape]:>10.3f}")
    print("  one payment at a time through the store (the gateway's code), 3 ms idle before each:")
    for step in ("session read", "claim", "decide", "before the answer", "finish", "caller cpu",
                 "replay (session read + claim)"):
        label = {"caller cpu": "CPU of the calling process (the gateway's share)",
                 "replay (session read + claim)": "a replay of it: session read + claim"}.get(step, step)
        print(f"    {label:<50}{stores['postgres'][step]:>12.3f}{stores['sqlite'][step]:>10.3f}")
    print(f"    {'CPU of the PostgreSQL backends':<50}{stores['postgres']['server cpu']:>12.3f}{'-':>10}")
    print("  server settings: " + ", ".join(f"{k}={v}" for k, v in why["settings"].items()))
    sequential = {c: 1000 / summary["rates"][c]["sequential"]["median"] for c in summary["rates"]}
    one = next((c for c in summary["rates"] if c != "sqlite"), None)
    if one is None:
        return
    cpu = {c: summary["cpu_ms"][c]["sequential"] for c in ("sqlite", one)}
    store = {name: stores[name]["before the answer"] for name in ("postgres", "sqlite")}
    print(f"  so: a sequential payment takes {sequential['sqlite']:.2f} ms on SQLite and {sequential[one]:.2f} ms on"
          f" {one}"
          f" ({sequential[one] - sequential['sqlite']:+.2f}); the store's work before the answer"
          f" {store['postgres'] - store['sqlite']:+.2f} ms; CPU per payment on the same cores: the gateway"
          f" {cpu[one]['gateways'] - cpu['sqlite']['gateways']:+.2f} ms, PostgreSQL's backends"
          f" {cpu[one].get('postgres', 0):.2f} ms, the banks"
          f" {cpu[one]['SBI'] + cpu[one]['HDFC'] - cpu['sqlite']['SBI'] - cpu['sqlite']['HDFC']:+.2f} ms")
