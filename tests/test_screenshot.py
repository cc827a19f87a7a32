"""`python -m bench.screenshot` makes the documents' pictures from the running app: real servers on the demo
configuration, the wallet under Pilot, three payments, then one more queued in offline mode. Run here so the
script keeps working as the wallet changes (a few seconds)."""
from __future__ import annotations

import html
import re
from collections import defaultdict
from pathlib import Path

from bench.screenshot import make_screenshots


def svg_text_lines(svg: str) -> list[str]:
    """The terminal lines of a Textual SVG screenshot as text (each line is drawn as several <text> pieces)."""
    lines: defaultdict[int, list[str]] = defaultdict(list)
    for number, piece in re.findall(r'<text [^>]*clip-path="url\(#terminal-\d+-line-(\d+)\)"[^>]*>(.*?)</text>', svg):
        lines[int(number)].append(html.unescape(piece).replace("\xa0", " "))
    return ["".join(lines[n]) for n in sorted(lines)]


def test_the_screenshots_show_alice_after_her_payments_and_one_queued(tmp_path: Path) -> None:
    paid, offline = ("\n".join(svg_text_lines(p.read_text(encoding="utf-8"))) for p in make_screenshots(tmp_path))
    assert "Strife wallet · alice" in paid and "online" in paid
    # The money moved as paid: ₹50,000 − ₹2,500 and ₹15,000 − ₹1,200.50; the declined ₹20,000 moved nothing.
    assert re.search(r"SBI-1001 +₹47,500\.00 +₹47,500\.00", paid)
    assert re.search(r"HDFC-2002 +₹13,799\.50 +₹13,799\.50", paid)
    history = re.findall(r"→ +(HDFC-2001|SBI-1002|HDFC-2003) +(₹[\d,.]+) +(succeeded|declined)", paid)
    assert sorted(history) == [("HDFC-2001", "₹2,500.00", "succeeded"), ("HDFC-2003", "₹20,000.00", "declined"),
                               ("SBI-1002", "₹1,200.50", "succeeded")]
    # Offline mode: the ₹250 waits in Pending, never sent, and the balance has not moved.
    assert "offline mode" in offline
    assert re.search(r"SBI-1001 +HDFC-2001 +₹250\.00 +queued +0", offline)
    assert re.search(r"SBI-1001 +₹47,500\.00", offline)
