"""The servers' log handler: lines logged during one loop turn leave in one write, in order, soon after."""
from __future__ import annotations

import asyncio
import io
import logging
import threading

from servers.serving import LoopBufferedHandler, _Formatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def make_logger(stream: CountingStream) -> logging.Logger:
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(_Formatter("%(asctime)s test %(levelname)s %(message)s"))
    logger = logging.getLogger(f"strife.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_lines_of_one_loop_turn_are_written_together_and_in_order() -> None:
    stream = CountingStream()
    logger = make_logger(stream)

    async def scenario() -> tuple[str, int]:
        for i in range(50):
            logger.info("line %d", i)
        held_back = stream.getvalue()
        await asyncio.sleep(0)  # one loop turn: the handler's flush runs
        return held_back, stream.writes

    held_back, writes = asyncio.run(scenario())
    assert held_back == "" and writes == 1
    lines = stream.getvalue().splitlines()
    assert [line.split(" INFO ")[1] for line in lines] == [f"line {i}" for i in range(50)]
    assert all(line[:4].isdigit() and line[19] == "," for line in lines)  # 2026-11-26 15:04:05,123


def test_lines_logged_off_the_loop_are_written_at_once() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.info("no loop here")
    assert stream.getvalue().endswith("no loop here\n")
    worker = threading.Thread(target=logger.info, args=("from a thread",))
    worker.start()
    worker.join()
    assert stream.getvalue().endswith("from a thread\n")
