"""KeyedTable: rows rendered before the table measured its columns are drawn again at the measured widths."""
from __future__ import annotations

from textual.app import App, ComposeResult

from wallet_tui.widgets.keyed_table import KeyedTable


class Table(KeyedTable):
    COLUMNS = (("from", "From"), ("to", "To"))


class TableApp(App):
    def compose(self) -> ComposeResult:
        yield Table()


def _text(table: Table, y: int) -> str:
    return "".join(segment.text for segment in table.render_line(y))


async def test_a_line_drawn_before_the_columns_were_measured_is_redrawn_at_their_width() -> None:
    # DataTable measures columns when idle, but a line drawn before that keeps its cache key and so its
    # narrow columns (Textual issue #3533): on a busy machine the screen showed "SBI-  HD" for good.
    app = TableApp()
    async with app.run_test(size=(60, 10)) as pilot:
        table = app.query_one(Table)
        await pilot.pause()
        table.sync({"k1": ("SBI-1001", "HDFC-2001")})
        assert "HDFC-2001" not in _text(table, 1)     # drawn now, before the table is idle: cut short
        await pilot.pause()
        assert [c.content_width for c in table.ordered_columns] == [8, 9]
        assert "SBI-1001" in _text(table, 1) and "HDFC-2001" in _text(table, 1)
        assert _text(table, 0).split() == ["From", "To"] and _text(table, 0).index("To") >= 9
        table.sync({"k1": ("SBI-1001", "ICICI-3001-LONG")})   # a cell updated in place grows: redrawn too
        _text(table, 1)
        await pilot.pause()
        assert "ICICI-3001-LONG" in _text(table, 1)
