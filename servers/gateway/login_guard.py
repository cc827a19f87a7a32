"""Login throttling. A password check is slow on purpose (scrypt, ~20 ms of CPU and 16 MB), so unlimited
logins would be a lever against the gateway: 16 threads of wrong passwords once made every payment 5× slower.

- Failed logins are counted per username and per peer address in fixed windows on the monotonic clock. An
  attempt is counted when it starts (and given back if the password was right), so concurrent attempts cannot
  slip past the limit while their checks run. Over the limit, a login is refused with RESOURCE_EXHAUSTED
  *before* any password is checked, until the window ends. Names that are not users are counted like users,
  so the refusal does not tell which usernames exist.
- At most `concurrency` password checks run at once, and at most `queue` logins wait for one; more are
  refused at once. A check runs to its end even if its caller goes away, and keeps its slot until then.
- Memory is bounded: each table keeps at most `capacity` keys, least recently used dropped first.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from servers.faults import delay_at


@dataclass(frozen=True)
class LoginLimits:
    failures_per_user: int = 10
    failures_per_peer: int = 100
    window: float = 60.0
    concurrency: int = 2
    queue: int = 64


class LoginRefused(Exception):
    """Refused without checking the password; the message tells a person what to do."""


@dataclass
class _Window:
    ends: float
    count: int


class FailureWindows:
    """Attempts per key in fixed windows, `limit` per `window` seconds, at most `capacity` keys kept."""

    def __init__(self, limit: int, window: float, capacity: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def reserve(self, key: str) -> tuple[_Window | None, float]:
        """Count an attempt: (its window, 0), or (None, seconds until attempts are allowed again)."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None or window.ends <= now:
            window = self._windows[key] = _Window(now + self._window, 0)
        self._windows.move_to_end(key)
        if window.count >= self._limit:
            return None, window.ends - now
        window.count += 1
        while len(self._windows) > self._capacity:
            self._windows.popitem(last=False)
        return window, 0.0

    @staticmethod
    def give_back(window: _Window | None) -> None:
        """Uncount an attempt (a right password, or a check that never ran). A window that has ended, or was
        dropped from the table, is not touched: the object is then no longer the key's current window."""
        if window is not None and window.count > 0:
            window.count -= 1

    def __len__(self) -> int:
        return len(self._windows)


def peer_key(peer: str) -> str:
    """gRPC's peer string without the port ("ipv4:1.2.3.4:5678" → "ipv4:1.2.3.4"). An IPv6 peer counts as its
    /64: one host is commonly given a whole /64, so single addresses would cost an attacker nothing."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    if kind == "ipv6":
        try:
            return f"ipv6:{ipaddress.ip_network(host.strip('[]') + '/64', strict=False)}"
        except ValueError:
            pass
    return f"{kind}:{host}"


def _user_key(username: str) -> str:
    return username if len(username) <= 128 else hashlib.sha256(username.encode("utf-8", "replace")).hexdigest()


class LoginGuard:
    def __init__(self, limits: LoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._users = FailureWindows(limits.failures_per_user, limits.window, clock=clock)
        self._peers = FailureWindows(limits.failures_per_peer, limits.window, clock=clock)
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._waiting = 0

    async def check(self, username: str, peer: str, verify: Callable[[], bool]) -> bool:
        """Run `verify` (the slow password check) on a worker thread if the limits allow; its result.
        Raises LoginRefused when they do not."""
        user_window, user_wait = self._users.reserve(_user_key(username))
        if user_window is None:
            raise LoginRefused(f"too many failed logins for this user; try again in {user_wait:.0f} s")
        peer_window, peer_wait = self._peers.reserve(peer_key(peer))
        if peer_window is None:
            FailureWindows.give_back(user_window)
            raise LoginRefused(f"too many failed logins from your address; try again in {peer_wait:.0f} s")
        try:
            await self._take_slot()
        except BaseException:  # refused, or the caller went away: no password was checked
            FailureWindows.give_back(user_window)
            FailureWindows.give_back(peer_window)
            raise

        def settle(done: "asyncio.Future[bool]") -> None:
            self._slots.release()
            if not done.cancelled() and done.exception() is None and done.result():
                FailureWindows.give_back(user_window)
                FailureWindows.give_back(peer_window)

        check = asyncio.get_running_loop().run_in_executor(None, _delayed, verify)
        check.add_done_callback(settle)
        # Shielded: a caller that goes away does not free the slot while the check still runs on its thread.
        return await asyncio.shield(check)

    async def _take_slot(self) -> None:
        if self._slots.locked() and self._waiting >= self.limits.queue:
            raise LoginRefused("the gateway is busy checking other logins; try again in a few seconds")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1


def _delayed(verify: Callable[[], bool]) -> bool:
    pause = delay_at("password_check")  # tests: a slow check, to see what waits for it and what does not
    if pause:
        time.sleep(pause)
    return verify()
