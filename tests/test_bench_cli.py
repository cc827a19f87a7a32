"""The benchmark's command line: where the starter is looked for, a table that says when it did not run, and
the bare contract path it compares sequential payments with."""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from bench import ceiling, metrics_cost, pg_observe, replicas, replicas_report, run
from bench.starter import DEFAULT_STARTER
from tests.harness import free_port, make_certs
from tests.pg_support import admin_url, require_postgres

SECRET = "not-a-real-secret"

STRIFE = {"floor": 1500.0, "bare_path": 400.0, "sequential": 250.0, "concurrent": 600.0, "p50_ms": 4.0,
          "p99_ms": 7.0, "replay": 1000.0, "replay_1k_keys": 1000.0, "replay_100k_keys": 950.0,
          "rss_payments": 20000.0, "rss_before_mb": 73.0, "rss_after_mb": 75.0, "drain_count": 500.0,
          "drain": 180.0, "drain_exactly_once": 1.0, "wallet_startup_s": 0.4}


def _starter_like(folder: Path) -> Path:
    (folder / "servers").mkdir(parents=True)
    (folder / "protofiles").mkdir()
    (folder / "protofiles" / "payment.proto").write_text("syntax = \"proto3\";\n")
    (folder / "gen_certs.sh").write_text("")
    return folder


def test_a_given_starter_folder_must_exist_and_look_like_the_starter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such folder"):
        run.find_starter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not the starter code .*servers, protofiles/payment.proto, gen_certs.sh"):
        run.find_starter(tmp_path / "empty")
    assert run.find_starter(_starter_like(tmp_path / "starter")) == tmp_path / "starter"


def test_the_default_starter_is_used_only_if_it_is_there() -> None:
    assert run.find_starter(None) == (DEFAULT_STARTER if DEFAULT_STARTER.is_dir() else None)


def test_a_bad_starter_argument_is_refused_before_anything_runs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--starter", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "--starter" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("main, argv, error", [
    (run.main, ["--payments", "0"], "--payments must be at least 50"),
    (run.main, ["--payments", "7"], "--payments must be at least 50"),
    (run.main, ["--repeat", "0"], "--repeat must be at least 1"),
    (ceiling.main, ["--payments", "0"], "--payments must be at least 1"),
    (metrics_cost.main, ["--rounds", "0"], "--rounds must be ≥ 1"),
    (metrics_cost.main, ["--seconds", "0"], "--seconds > 0"),
])
def test_bad_counts_are_refused_before_anything_runs(main, argv, error, tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                                     monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a run would make its sandbox
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and error in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no sandbox was made, no server started


def test_the_table_says_the_starter_did_not_run_instead_of_showing_nan(capsys) -> None:  # type: ignore[no-untyped-def]
    run.print_table(STRIFE, {})
    table = capsys.readouterr().out
    assert "nan" not in table
    sequential = next(line for line in table.splitlines() if line.startswith("sequential"))
    assert "not run" in sequential and "50.0% of floor/3" in sequential and "starter," not in sequential


def test_the_table_compares_with_the_starter_when_it_ran(capsys) -> None:  # type: ignore[no-untyped-def]
    run.print_table(STRIFE, {"sequential": 50.0, "concurrent": 120.0, "p50_ms": 19.0, "p99_ms": 40.0})
    lines = capsys.readouterr().out.splitlines()
    sequential = next(line for line in lines if line.startswith("sequential"))
    concurrent = next(line for line in lines if line.startswith("concurrent"))
    assert "5.00x starter, 50.0% of floor/3" in sequential and " 50 " in sequential
    bare = next(line for line in lines if line.startswith("bare contract path"))
    assert "sequential is 62% of it; 5x starter would be 62%" in bare
    assert "5.00x starter" in concurrent and "not run" not in "\n".join(lines)


def test_a_ratio_just_below_a_target_is_not_rounded_up_to_it(capsys) -> None:  # type: ignore[no-untyped-def]
    starter = {"sequential": STRIFE["sequential"] / 4.98, "concurrent": STRIFE["concurrent"] / 4.98}
    run.print_table(STRIFE, {**starter, "p50_ms": 19.0, "p99_ms": 40.0})
    table = capsys.readouterr().out
    assert "4.98x starter" in table and "5.0x" not in table
    assert "4.98x / 4.98x" in run.summary(STRIFE, starter)


def test_the_bare_contract_path_makes_every_durable_write_the_contract_orders(tmp_path: Path) -> None:
    """Gateway: the key and the decision; each bank: its vote and its commit — two rows each per payment."""
    certs = make_certs(tmp_path / "certs")
    rate = ceiling.sequential_rate(certs, tmp_path / "bare", sync=True, payments=50)
    rows = {db.name: sqlite3.connect(db).execute("SELECT count(*) FROM j").fetchone()[0]
            for db in (tmp_path / "bare").glob("*.db")}
    assert len(rows) == 3 and rate > 0
    assert len(set(rows.values())) == 1, rows  # every payment reached both banks, twice
    assert rows["gateway.db"] >= 2 * (50 + 200)  # the measured payments and the warm-up, each written twice


# ---- the PostgreSQL store and replicas (bench/replicas.py, also `bench.run --store`) ----------------------------

@pytest.mark.parametrize("main, argv, error", [
    (run.main, ["--store", "mysql://root@localhost/db"], "--store takes a PostgreSQL admin URL"),
    (run.main, ["--store", "sqlite"], "--store takes a PostgreSQL admin URL"),
    (run.main, ["--rounds", "3"], "--rounds measures the PostgreSQL store: it needs --store URL"),
    (run.main, ["--soak-payments", "100"], "--soak-payments measures the PostgreSQL store: it needs --store URL"),
    (replicas.main, [], "the following arguments are required: --store"),
    (replicas.main, ["--store", "postgresql://u@h/db", "--replicas", "0"], "--replicas: each count must be 1 to 8"),
    (replicas.main, ["--store", "postgresql://u@h/db", "--replicas", "two"], "give replica counts like 1,2,3"),
    (replicas.main, ["--store", "postgresql://u@h/db", "--rounds", "0"], "--rounds must be ≥ 1"),
    (replicas.main, ["--store", "postgresql://u@h/db", "--soak-payments", "5"], "--soak-payments must be 0"),
])
def test_bad_postgres_options_are_refused_before_anything_runs(  # type: ignore[no-untyped-def]
        main, argv, error, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and error in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("main", [run.main, replicas.main])
def test_an_unreachable_store_is_refused_at_once_and_its_password_never_shown(  # type: ignore[no-untyped-def]
        main, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port = free_port()  # nobody listens there
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"--store: cannot connect to postgresql://postgres:***@127.0.0.1:{port}/postgres" in err
    assert SECRET not in err and not list(tmp_path.iterdir())


def test_a_tiny_postgres_run_measures_every_part_and_drops_its_databases(  # type: ignore[no-untyped-def]
        capsys) -> None:
    require_postgres()
    url = admin_url()
    parts = urlsplit(url)
    if parts.password is None:  # a password the server ignores (trust) shows that none is ever printed
        netloc = f"{parts.username}:{SECRET}@{parts.hostname}:{parts.port or 5432}"
        with_secret = urlunsplit(parts._replace(netloc=netloc))
        url = with_secret if pg_observe.probe(with_secret) is None else url
    assert replicas.main(["--store", url, "--quick", "--seconds", "0.3", "--replicas", "2", "--soak-payments", "64",
                          "--sample-every", "0.2"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    result = json.loads(out.strip().splitlines()[-1])
    (only_round,) = result["rounds"]
    assert set(only_round) == {"sqlite", "pg×2"}
    for config in only_round.values():  # each cluster paid, replayed, and was checked conserved (else: raised)
        assert min(config["sequential"], config["concurrent"], config["replay"]) > 0
        assert config["cpu_ms"]["concurrent"]["gateways"] > 0 and config["cpu_ms"]["concurrent"]["SBI"] > 0
    assert only_round["pg×2"]["cpu_ms"]["concurrent"]["postgres"] > 0  # the backends serving its database
    soak = result["soak"]
    assert soak["payments"] == 64 and soak["other_sessions_max"] == 0
    for replica in ("gateway", "gateway2"):  # pool (1..8) + liveness: every session told apart by replica
        assert 2 <= soak["sessions"][replica]["max"] <= 9 and soak["rss_mb"][replica]["last"] > 0
    stores = result["why"]["stores_ms"]  # both real stores, one payment at a time
    assert stores["postgres"]["claim"] > 0 and stores["sqlite"]["claim"] > 0 and stores["postgres"]["server cpu"] >= 0
    assert "PostgreSQL sequential ≥ 0.7× SQLite's (pg×2)" in out and "paper estimate" in out
    admin = pg_observe.PgAdmin(admin_url())
    try:
        left = admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                           f"{pg_observe.DATABASE_PREFIX}{os.getpid()}\\_%")
    finally:
        admin.close()
    assert left == []


def test_a_target_is_judged_by_each_rounds_own_ratio() -> None:
    def config(sequential: float, concurrent: float, replay: float) -> dict:
        cpu = {"gateways": 1.0, "SBI": 0.5, "HDFC": 0.5, "client": 0.2, "postgres": 0.5}
        return {"sequential": sequential, "concurrent": concurrent, "replay": replay, "sequential_p50_ms": 5.0,
                "sequential_p99_ms": 9.0, "cpu_ms": {"concurrent": cpu, "sequential": cpu},
                "cpu_busy": {"concurrent": .9, "sequential": .3}, "machine_busy": {"concurrent": 1, "sequential": .5}}
    # A slow round and a fast one: the ratio in each is 0.6 and 0.8, though the medians' ratio is 0.7.
    rounds = [{"sqlite": config(100, 400, 900), "pg×1": config(60, 300, 200), "pg×2": config(50, 330, 200)},
              {"sqlite": config(300, 400, 900), "pg×1": config(240, 400, 800), "pg×2": config(200, 360, 700)}]
    summary = replicas_report.summarise(rounds)
    sequential = summary["ratios"]["pg×1 sequential / sqlite sequential"]
    assert (sequential["min"], sequential["max"]) == (0.6, 0.8) and sequential["median"] == pytest.approx(0.7)
    verdicts = {label: (measured, verdict) for label, measured, verdict in replicas_report.targets(summary)}
    assert verdicts["PostgreSQL sequential ≥ 0.7× SQLite's (pg×1)"] == ("0.70x [0.60x–0.80x]",
                                                                        "met by the median, not in every round")
    assert verdicts["replay ≥ 3× sequential (pg×1)"][1] == "met in every round"  # 3.33x and 3.33x
    assert verdicts["concurrent: pg×2 ≥ pg×1"] == ("1.00x [0.90x–1.10x]", "met by the median, not in every round")
    assert verdicts["replay ≥ 3× sequential (pg×2)"][1] == "met in every round"
    assert summary["trouble"] == []

    lost = "gateway2: ... lost the store session of owner 7 (liveness check failed: TimeoutError)"
    rounds[1]["pg×2"] |= {"gateway_trouble": [lost], "errors": {"concurrent": {"UNAVAILABLE": 3}}}
    rounds[0]["pg×1"] |= {"gateway_trouble": [lost]}
    assert replicas_report.summarise(rounds)["trouble"] == [
        f"round 1, pg×1: {lost}", f"round 2, pg×2: calls refused {{'concurrent': {{'UNAVAILABLE': 3}}}}; {lost}"]
    assert "pg×2: 1 trouble line(s) from its gateways" in replicas_report.round_line(rounds[1])


def test_the_paper_estimate_names_the_resource_that_binds_first() -> None:
    cpu = {"gateways": 2.0, "SBI": 0.4, "HDFC": 0.8, "client": 0.3, "postgres": 1.4}  # ms per payment
    estimate = replicas_report.paper_estimate(cpu, pg_cores=2, machines=range(1, 5))
    assert [(n, round(rate)) for n, rate, _ in estimate] == [(1, 500), (2, 1000), (3, 1250), (4, 1250)]
    assert [bottleneck for *_, bottleneck in estimate] == [
        "1 gateway replica (CPU)", "2 gateway replicas (CPU)", "the busier bank (CPU)", "the busier bank (CPU)"]
