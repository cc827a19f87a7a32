"""Keyed DataTables updated by diff: changed cells are updated in place, stale rows removed, new rows added."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

Cell = str | Text


class KeyedTable(DataTable):
    """A DataTable whose rows are identified by a key and refreshed with `sync({key: cells})` (in order)."""

    COLUMNS: tuple[tuple[str, str], ...] = ()   # (column key, label)

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._drawn_widths: tuple[int, ...] = ()

    def on_mount(self) -> None:
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    @property
    def row_keys(self) -> list[str]:
        return [str(row.key.value) for row in self.ordered_rows]

    def selected_key(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return str(row_key.value)

    def sync(self, rows: dict[str, tuple[Cell, ...]]) -> None:
        """Make the table show `rows`, in that order, touching only what changed. A change of order (a new
        row anywhere but at the end) rebuilds the table, keeping the cursor on the same row."""
        current = self.row_keys
        present = set(current)
        kept = [key for key in current if key in rows]
        added = [key for key in rows if key not in present]
        if kept + added != list(rows):
            self._rebuild(rows)
            return
        for key in current:
            if key not in rows:
                self.remove_row(key)
        columns = [key for key, _ in self.COLUMNS]
        for key in kept:
            for column, cell in zip(columns, rows[key]):
                if self.get_cell(key, column) != cell:
                    self.update_cell(key, column, cell, update_width=True)
        for key in added:
            self.add_row(*rows[key], key=key)

    def _update_dimensions(self, new_rows):  # type: ignore[no-untyped-def]
        """DataTable measures its columns when idle, but lines it drew before that keep their cache keys, so a
        table drawn on a busy loop could show cut-off columns ("SBI-  HD") until its next change (Textual issue
        #3533). When the measured widths change, invalidate every cached line and draw again."""
        super()._update_dimensions(new_rows)
        widths = tuple(column.get_render_width(self) for column in self.ordered_columns)
        if widths != self._drawn_widths:
            self._drawn_widths = widths
            self._update_count += 1     # every DataTable render cache is keyed on it
            self.refresh()

    def _rebuild(self, rows: dict[str, tuple[Cell, ...]]) -> None:
        selected = self.selected_key()
        self.clear()
        for key, cells in rows.items():
            self.add_row(*cells, key=key)
        if selected in rows:
            self.move_cursor(row=self.get_row_index(selected), animate=False)

