"""run_all.py supervises what it starts (CONTRACT §10): a server killed under `run_all.py --servers-only` is
restarted and serves again; one that keeps failing is given up on, saying so, while the others keep running;
stopping run_all during a restart's backoff leaves no server behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from servers.supervisor import Backoff, RestartPolicy, Supervisor, open_log
from tests.harness import (OPENING_TOTAL, REPO, Cluster, certs_module_client_credentials, health_ok,
                           server_processes, wait_until)


class RunAll:
    """`run_all.py --servers-only` as a real process, on a Cluster's config, ports and data directory (the
    Cluster reads the ledgers and makes clients; run_all, not the Cluster, runs the servers)."""

    def __init__(self, root: Path, extra: list[str]) -> None:
        self.cluster = Cluster(root, root / "certs")
        self.data = self.cluster.data_dir
        self.out_path = root / "run_all.out"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "run_all.py", "--servers-only", "--config-dir", str(self.cluster.config_dir),
                 "--certs-dir", str(self.cluster.certs_dir), "--data-dir", str(self.data),
                 "--gateway-port", str(self.cluster.gateway_port), "--no-metrics", *extra],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until(lambda: self.proc.poll() is not None or "Strife is running" in self.output(), 60, 0.05,
                   "run_all to report every server healthy")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def run_all_log(self) -> str:
        return (self.data / "logs" / "run_all.log").read_text(errors="replace")

    def pid(self, role: str) -> int | None:
        """The live process of `role`: "gateway" or a bank's name."""
        marker = "servers.gateway_server" if role == "gateway" else f"--bank {role} "
        pids = [pid for pid, cmdline in server_processes(str(self.data)).items() if marker in cmdline]
        assert len(pids) <= 1, pids
        return pids[0] if pids else None

    def healthy(self, role: str) -> bool:
        if role == "gateway":
            creds = grpc.ssl_channel_credentials((self.cluster.certs_dir / "ca.crt").read_bytes())
            return health_ok(f"localhost:{self.cluster.gateway_port}", creds)
        creds = certs_module_client_credentials(self.cluster.certs_dir, "gateway")
        return health_ok(f"localhost:{self.cluster.bank_ports[role]}", creds)

    def kill(self, role: str) -> int:
        pid = self.pid(role)
        assert pid is not None, f"no {role} process"
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, role: str, old_pid: int) -> int:
        """The new process of `role` answers SERVING; its pid."""
        wait_until(lambda: self.pid(role) not in (None, old_pid) and self.healthy(role), 15, 0.05,
                   f"{role} serving again under a new process")
        return self.pid(role)

    def stop(self, timeout: float = 30) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return self.output()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in server_processes(str(self.data)):
            os.kill(pid, signal.SIGKILL)
        self.cluster.stop()


StartRunAll = Callable[..., RunAll]  # start_run_all(*extra run_all flags)


@pytest.fixture
def start_run_all(tmp_path: Path) -> Iterator[StartRunAll]:
    started: list[RunAll] = []

    def start(*extra: str) -> RunAll:
        started.append(RunAll(tmp_path, ["--restart-delay", "0.1", *extra]))
        return started[-1]

    yield start
    for run_all in started:
        run_all.close()


def _pay_and_check(run_all: RunAll, key: str, amount_paise: int, before: dict[str, tuple[int, int]]) -> None:
    """A fresh login and a payment SBI-1001 → HDFC-2001: both balances move by the amount, money is conserved."""
    client = run_all.cluster.client("alice")
    paid = client.pay_until_final(key, "SBI-1001", "HDFC-2001", amount_paise / 100, deadline=15)
    assert paid.success, paid.message
    after = run_all.cluster.accounts()
    assert after["SBI-1001"][0] == before["SBI-1001"][0] - amount_paise
    assert after["HDFC-2001"][0] == before["HDFC-2001"][0] + amount_paise
    assert run_all.cluster.total() == OPENING_TOTAL
    assert run_all.cluster.holds() == 0


def test_a_killed_gateway_is_restarted_and_payments_work_again(start_run_all: StartRunAll) -> None:
    run_all = start_run_all()
    _pay_and_check(run_all, "before-kill", 1000, run_all.cluster.accounts())
    old = run_all.kill("gateway")
    new = run_all.wait_restarted("gateway", old)

    _pay_and_check(run_all, "after-restart", 2550, run_all.cluster.accounts())
    wait_until(lambda: "gateway is serving again" in run_all.output(), 10, message="the 'serving again' line")
    out = run_all.output()
    assert "gateway exited (killed by SIGKILL)" in out and "restarting it in 0.1 s (attempt 1)" in out
    assert f"gateway restarted (pid {new})" in run_all.run_all_log()
    # Restarted by a supervisor thread, it lives on (PDEATHSIG follows the thread that forked it): one restart.
    assert run_all.pid("gateway") == new and out.count("restarting it in") == 1
    assert "run_all WARNING gateway exited (killed by SIGKILL)" in (run_all.data / "logs" / "gateway.log").read_text()
    assert run_all.stop() and run_all.proc.returncode == 0
    assert server_processes(str(run_all.data)) == {}


def test_a_killed_bank_is_restarted_with_its_ledger_and_payments_reach_it_again(start_run_all: StartRunAll) -> None:
    run_all = start_run_all()
    _pay_and_check(run_all, "before-kill", 700, run_all.cluster.accounts())
    before = run_all.cluster.accounts()
    old = run_all.kill("HDFC")
    run_all.wait_restarted("HDFC", old)

    assert run_all.cluster.accounts() == before  # the restarted bank kept its ledger
    alice = run_all.cluster.client("alice")  # SBI-1001 and HDFC-2002: both banks answer through the gateway
    wait_until(lambda: len(alice.balances().accounts) == 2, 10, message="the gateway to reach HDFC again")
    _pay_and_check(run_all, "after-restart", 300, before)
    assert "bank HDFC exited (killed by SIGKILL)" in run_all.run_all_log()
    run_all.stop()
    assert run_all.proc.returncode == 0
    assert server_processes(str(run_all.data)) == {}


def test_a_server_that_keeps_failing_is_given_up_on_and_the_others_keep_running(start_run_all: StartRunAll) -> None:
    run_all = start_run_all("--restart-limit", "3")
    port = run_all.cluster.gateway_port
    with socket.socket() as squatter:
        # Frozen, run_all cannot restart the gateway before another program takes its port: every restart
        # then fails at once ("cannot listen on port"), as a real crash loop does.
        run_all.proc.send_signal(signal.SIGSTOP)
        try:
            run_all.kill("gateway")
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            wait_until(lambda: _bound(squatter, port), 10, 0.02, "the gateway's port to be free")
            squatter.listen()
        finally:
            run_all.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "giving up on it" in run_all.output(), 15, 0.05, "run_all to give up on the gateway")

    out = run_all.output()
    assert "gateway exited (exit code 2)" in out
    assert "giving up on it: it exited 3 times within 60 s. The other servers keep running" in out
    assert out.count("restarting it in") == 2  # 0.1 s, then 0.2 s; the third exit is the last
    assert "cannot listen on port" in (run_all.data / "logs" / "gateway.log").read_text()
    assert "giving up on it" in run_all.run_all_log()
    assert run_all.proc.poll() is None and run_all.pid("gateway") is None
    assert run_all.healthy("SBI") and run_all.healthy("HDFC")
    run_all.stop()
    assert run_all.proc.returncode == 1  # it ran degraded: a script or service manager should know
    assert server_processes(str(run_all.data)) == {}


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        return False
    return True


def test_sigterm_during_a_restart_backoff_leaves_no_server_behind(start_run_all: StartRunAll) -> None:
    run_all = start_run_all("--restart-delay", "30")
    run_all.kill("SBI")
    wait_until(lambda: "restarting it in 30 s" in run_all.output(), 10, 0.05, "the restart to be scheduled")

    started = time.monotonic()
    out = run_all.stop(timeout=20)
    assert time.monotonic() - started < 15  # the 30 s backoff does not hold up the shutdown
    assert run_all.proc.returncode == 0
    assert "all servers stopped" in out and "bank SBI restarted" not in out
    assert server_processes(str(run_all.data)) == {}


def test_no_restart_reports_the_exit_and_leaves_the_server_down(start_run_all: StartRunAll) -> None:
    run_all = start_run_all("--no-restart")
    run_all.kill("gateway")
    wait_until(lambda: "not restarting it (--no-restart)" in run_all.output(), 10, 0.05, "the exit report")
    assert run_all.pid("gateway") is None and not run_all.healthy("gateway")
    assert run_all.healthy("SBI") and run_all.healthy("HDFC")
    run_all.stop()
    assert run_all.proc.returncode == 1


def test_backoff_doubles_to_its_cap_starts_over_after_a_long_run_and_gives_up_on_a_crash_loop() -> None:
    backoff = Backoff(RestartPolicy(first_delay=0.5, max_delay=2.0, reset_after=30.0, limit=5, window=60.0))
    assert [backoff.after_exit(1.0, now) for now in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 2.0]
    assert backoff.after_exit(1.0, 4) is None  # the fifth exit within 60 s

    backoff = Backoff(RestartPolicy(first_delay=0.5, max_delay=8.0, reset_after=30.0, limit=3, window=60.0))
    assert [backoff.after_exit(1.0, now) for now in (0, 1)] == [0.5, 1.0]
    assert backoff.after_exit(45.0, 46) == 0.5  # up 45 s: it can work, so delay and crash count start over
    assert backoff.after_exit(1.0, 47) == 1.0
    assert backoff.after_exit(1.0, 200) == 2.0  # the exits at 46 and 47 s are outside the window by now
    assert backoff.after_exit(1.0, 201) == 4.0
    assert backoff.after_exit(1.0, 202) is None

    assert Backoff(RestartPolicy(enabled=False)).after_exit(100.0, 0) is None


class _SlowToRestart:
    """A real process whose restart can be held half-way, to stop run_all exactly then."""
    name = "sleeper"
    health_check = None

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.restarting, self.release = threading.Event(), threading.Event()
        self.procs = [self._spawn()]

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[-1]

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def start(self) -> None:
        self.restarting.set()
        assert self.release.wait(10)
        self.procs.append(self._spawn())


def test_stopping_during_a_restart_stops_the_restarted_process_too(tmp_path: Path) -> None:
    server = _SlowToRestart(tmp_path / "sleeper.log")
    supervisor = Supervisor([server], RestartPolicy(first_delay=0.01), open_log(tmp_path / "run_all.log", None))

    def stop() -> None:  # run_all's shutdown: halt the supervisor, then stop the server's current process
        supervisor.halt()
        server.proc.terminate()

    try:
        supervisor.start()
        server.proc.kill()
        assert server.restarting.wait(10)
        stopping = threading.Thread(target=stop)
        stopping.start()
        stopping.join(0.3)  # the stop has begun (or, if it does not wait for the restart, ended)
        server.release.set()
        stopping.join(10)
        supervisor.join(10)
        assert len(server.procs) == 2  # one restart, and nothing started after the stop
        for proc in server.procs:  # the one started during the stop is stopped too: no orphan
            assert proc.wait(10) is not None
    finally:
        server.release.set()
        for proc in server.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
