"""run_all's supervision of the servers it started (CONTRACT §10): a server that exits while run_all is not
stopping is restarted with exponential backoff; one that keeps exiting is given up on, saying so.

Each server has a watcher thread that blocks in `wait()` on the server's process (no polling). The watcher
also makes every restart of its server, and stays alive as long as the process it started: a server asks
for SIGTERM when its parent dies (PR_SET_PDEATHSIG), and Linux sends that signal when the *thread* that
forked it ends, not the whole process.

Stopping is guarded by a lock: once `halt()` has returned no watcher starts a process any more, so the
caller's stop afterwards reaches every process ever started, including one restarted a moment before.
"""
from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, TextIO


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.5   # seconds before the first restart; doubled for each restart after it
    max_delay: float = 30.0    # the doubling stops here
    reset_after: float = 30.0  # a run this long shows the server can work: delay and crash count start over
    limit: int = 5             # this many exits within `window` seconds: stop restarting it
    window: float = 60.0
    enabled: bool = True       # False (--no-restart): report an exit, never restart


DEFAULT_POLICY = RestartPolicy()
RESTART_HELP = (
    "A server that exits while run_all is running (a crash, kill -9, a stray SIGTERM) is restarted after "
    f"{DEFAULT_POLICY.first_delay:g} s, then twice as long before each further attempt, up to "
    f"{DEFAULT_POLICY.max_delay:g} s; a server that stays up for {DEFAULT_POLICY.reset_after:g} s starts over. "
    f"A server that exits {DEFAULT_POLICY.limit} times within {DEFAULT_POLICY.window:g} s is given up on: "
    "run_all says so, keeps the others running, and exits 1 when stopped. Restarts and give-ups are logged "
    "in <data-dir>/logs/run_all.log, in the server's own log, and with --servers-only on run_all's output.")


# run_all.log's lines, and the notes run_all writes into a server's own log.
FILE_FORMAT = logging.Formatter("%(asctime)s run_all %(levelname)s %(message)s")


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value!r}")
    return number


def add_restart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-restart", action="store_true",
                        help="do not restart a server that exits (it is still reported)")
    # The policy's numbers: hidden, for tests that cannot wait for the defaults.
    hidden, policy = argparse.SUPPRESS, DEFAULT_POLICY
    parser.add_argument("--restart-delay", type=_positive, default=policy.first_delay, help=hidden)
    parser.add_argument("--restart-max-delay", type=_positive, default=policy.max_delay, help=hidden)
    parser.add_argument("--restart-reset-after", type=_positive, default=policy.reset_after, help=hidden)
    parser.add_argument("--restart-limit", type=int, default=policy.limit, help=hidden)
    parser.add_argument("--restart-window", type=_positive, default=policy.window, help=hidden)


def restart_policy(args: argparse.Namespace) -> RestartPolicy:
    return RestartPolicy(first_delay=args.restart_delay, max_delay=args.restart_max_delay,
                         reset_after=args.restart_reset_after, limit=max(1, args.restart_limit),
                         window=args.restart_window, enabled=not args.no_restart)


class Backoff:
    """When to restart one server after each of its exits, or None to give up on it."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.attempt = 0  # restarts since the last reset
        self._delay = policy.first_delay
        self._exits: deque[float] = deque()

    def after_exit(self, uptime: float, now: float) -> float | None:
        policy = self.policy
        if not policy.enabled:
            return None
        if uptime >= policy.reset_after:
            self.attempt, self._delay = 0, policy.first_delay
            self._exits.clear()
        self._exits.append(now)
        while self._exits and self._exits[0] < now - policy.window:
            self._exits.popleft()
        if len(self._exits) >= policy.limit:
            return None
        delay, self._delay = self._delay, min(self._delay * 2, policy.max_delay)
        self.attempt += 1
        return delay

    @property
    def recent_exits(self) -> int:
        """Exits within the window, as of the last one."""
        return len(self._exits)


class Supervised(Protocol):
    """What the supervisor needs of a server (run_all's `Server`)."""
    name: str
    log_path: Path
    proc: subprocess.Popen
    health_check: Callable[[], bool] | None  # True once the server answers SERVING

    def start(self) -> None: ...


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def open_log(path: Path, echo: TextIO | None) -> logging.Logger:
    """run_all's own log: `path` always; `echo` too (stdout with --servers-only, never over the wallet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("strife.run_all")
    logger.propagate = False  # never reaches a root handler that might draw on the wallet's terminal
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(FILE_FORMAT)
    logger.addHandler(to_file)
    if echo is not None:
        to_echo = logging.StreamHandler(echo)
        to_echo.setFormatter(logging.Formatter("run_all: %(message)s"))
        logger.addHandler(to_echo)
    return logger


class Supervisor:
    def __init__(self, servers: Sequence[Supervised], policy: RestartPolicy, log: logging.Logger, *,
                 health_timeout: float = 30.0) -> None:
        self._servers = list(servers)
        self._policy = policy
        self._log = log
        self._health_timeout = health_timeout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.given_up: list[str] = []  # one line per server no longer restarted, for the final report

    def start(self) -> None:
        for server in self._servers:
            thread = threading.Thread(target=self._watch, args=(server,), name=f"supervise {server.name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def halt(self) -> None:
        """No restart from now on; a restart already under way has finished when this returns."""
        with self._lock:
            self._stopping.set()

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the watchers to notice their servers stopped (after `halt()` and stopping them)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _watch(self, server: Supervised) -> None:
        try:
            self._supervise(server)
        except Exception:  # noqa: BLE001 - a bug here must be seen in the log, not end the thread silently
            self._log.exception("supervising %s failed; it will not be restarted", server.name)

    def _supervise(self, server: Supervised) -> None:
        backoff = Backoff(self._policy)
        started = time.monotonic()
        while True:
            code = server.proc.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            what = f"exited ({describe_exit(code)}) after {now - started:.1f} s"
            delay = backoff.after_exit(now - started, now)
            if delay is None:
                why = (f"giving up on it: it exited {backoff.recent_exits} times within {self._policy.window:g} s"
                       if self._policy.enabled else "not restarting it (--no-restart)")
                self._give_up(server, what, why)
                return
            self._log.warning("%s %s; restarting it in %g s (attempt %d)", server.name, what, delay,
                              backoff.attempt)
            _note(server, f"{what}; restarting in {delay:g} s (attempt {backoff.attempt})")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    server.start()
                except OSError as exc:
                    self._give_up(server, f"could not be restarted ({exc})", "giving up on it")
                    return
            started = time.monotonic()
            self._log.info("%s restarted (pid %d)", server.name, server.proc.pid)
            self._await_serving(server, started)

    def _await_serving(self, server: Supervised, started: float) -> None:
        """Say when a restarted server answers its health check; an exit meanwhile is the loop's to handle."""
        if server.health_check is None:
            return
        while server.proc.poll() is None and not self._stopping.is_set():
            if server.health_check():
                self._log.info("%s is serving again (%.1f s after its restart)", server.name,
                               time.monotonic() - started)
                return
            if time.monotonic() - started > self._health_timeout:
                self._log.warning("%s is running but not serving %g s after its restart (log: %s)",
                                  server.name, self._health_timeout, server.log_path)
                return
            self._stopping.wait(0.2)

    def _give_up(self, server: Supervised, what: str, why: str) -> None:
        line = f"{server.name} {what}; {why}. The other servers keep running; see {server.log_path}"
        self._log.error("%s", line)
        _note(server, f"{what}; {why}")
        self.given_up.append(line)


def _note(server: Supervised, message: str) -> None:
    """A line in the server's own log, so a reader of it sees why the log restarts or ends there."""
    line = FILE_FORMAT.format(logging.makeLogRecord({"levelname": "WARNING", "msg": f"{server.name} {message}"}))
    try:
        with open(server.log_path, "a", encoding="utf-8") as log:  # the server is not running: no interleaving
            log.write(line + "\n")
    except OSError:
        pass  # the log is for people; supervision goes on without it
