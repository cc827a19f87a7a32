"""A small TCP proxy for fault injection: cut a link, let requests through and lose the replies, blackhole
the open connections (bytes vanish, nothing is closed: a link that died silently), or stall them (bytes held
until `flow()`).

TLS passes through untouched (the proxy only copies bytes), so clients still verify the real server.
"""
from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[tuple[socket.socket, socket.socket]] = set()
        self._cut = False
        self._drop_replies = 0          # how many replies still to lose (-1: all of them)
        self._drop_min_bytes = 0        # reply chunks smaller than this pass even while dropping is armed
        self.dropped_replies = 0
        self.connections = 0
        self._blackholed: set[tuple[socket.socket, socket.socket]] = set()
        self.blackholed_closed = 0      # blackholed connections their client gave up on (closed its end)
        self._flowing = threading.Event()  # cleared by stall(): every open connection holds its bytes
        self._flowing.set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name=f"proxy:{self.port}").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- controls ------------------------------------------------------------------------------------------
    def cut(self) -> None:
        """Close every open connection and refuse new ones until `restore()`."""
        with self._lock:
            self._cut = True
            conns = list(self._conns)
        for pair in conns:
            self._close_pair(pair)

    def restore(self) -> None:
        with self._lock:
            self._cut = False
            self._drop_replies = 0

    def drop_replies(self, count: int = 1, min_bytes: int = 0) -> None:
        """Let requests through but lose the next `count` replies (-1: every reply): the first bytes coming
        back from the server on a connection are discarded and that connection is reset.

        With `min_bytes`, reply chunks shorter than that still pass, so HTTP/2 control frames (a PING or
        WINDOW_UPDATE is well under 100 bytes, even in a TLS record) get through and the chunk lost is the
        RPC's response itself, sent only once the server has finished the call."""
        with self._lock:
            self._drop_replies = count
            self._drop_min_bytes = min_bytes

    def blackhole(self) -> None:
        """The open connections die silently: from now on their bytes vanish both ways and nothing is closed
        on the client's side (no FIN, no RST), as when a route or a NAT entry is lost. Only a client that
        notices on its own (keepalive) gets away from them; new connections are forwarded as usual."""
        with self._lock:
            self._blackholed |= self._conns

    def stall(self) -> None:
        """The links go silent: bytes are held, nothing is closed (no FIN, no RST) — what a peer sees when a link
        or a machine vanishes. Neither end is told anything; only a timeout can notice. Until `flow()`."""
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.cut()
        try:
            self._listener.close()
        except OSError:
            pass

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._conns.add(pair)
                self.connections += 1
            threading.Thread(target=self._pump, args=(pair, client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, upstream, client, True), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket,
              is_reply: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if pair in self._blackholed:
                    continue
                if is_reply:
                    with self._lock:
                        lose = self._drop_replies != 0 and len(data) >= self._drop_min_bytes
                        if lose:
                            if self._drop_replies > 0:
                                self._drop_replies -= 1
                            self.dropped_replies += 1
                    if lose:
                        break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            silent = pair in self._blackholed
            if silent and not is_reply:
                self.blackholed_closed += 1
                self._blackholed.discard(pair)
        if silent and is_reply:  # the server's end closed: the client must not hear of it
            self._close_socket(src)
            return
        self._close_pair(pair)

    def _close_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._conns.discard(pair)
            self._blackholed.discard(pair)
        for sock in pair:
            self._close_socket(sock)

    @staticmethod
    def _close_socket(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
