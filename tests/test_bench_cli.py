"""The benchmark's command line: where the starter is looked for, a table that says when it did not run, and
the bare contract path it compares sequential payments with."""
from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest

from bench import ceiling, metrics_cost, run
from bench.starter import DEFAULT_STARTER
from tests.harness import make_certs

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
