"""The TCP proxy of the tests (tests/tcpproxy.py) in a process of its own, driven over stdin/stdout.

A benchmark that cuts a link must not pay for the proxy in its own process: the proxy's relay threads would
compete for the measuring process's GIL on every byte and slow the thing being measured.

    python -m bench.proxy_process TARGET_PORT     prints its own port, then answers "cut", "restore", "quit"
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tcpproxy import TcpProxy

REPO = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """The parent's handle: `address`, `cut()`, `restore()`, `close()`."""

    def __init__(self, target_port: int) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.proxy_process", str(target_port)], cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()  # type: ignore[union-attr]
        if not line.strip().isdigit():
            self._proc.kill()
            raise RuntimeError(f"the proxy process did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line)}"

    def _command(self, word: str) -> None:
        self._proc.stdin.write(word + "\n")  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]
        answer = self._proc.stdout.readline().strip()  # type: ignore[union-attr]
        if answer != "ok":
            raise RuntimeError(f"proxy process: {word!r} answered {answer!r}")

    def cut(self) -> None:
        self._command("cut")

    def restore(self) -> None:
        self._command("restore")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._command("quit")
            except (OSError, RuntimeError):
                pass
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


def main(argv: list[str]) -> int:
    proxy = TcpProxy(int(argv[0]))
    print(proxy.port, flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word == "cut":
            proxy.cut()
        elif word == "restore":
            proxy.restore()
        elif word == "quit":
            proxy.close()
            print("ok", flush=True)
            return 0
        else:
            print(f"unknown command {word!r}", flush=True)
            continue
        print("ok", flush=True)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
