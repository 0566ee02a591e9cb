"""The filter bar: the filter language of ``vsproxy read``, checked as it is typed (the error and a
caret under the bad token show below it), with field-name completion and a history."""

from __future__ import annotations

import re
from typing import Final

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.suggester import Suggester
from textual.widgets import Input, Static

from vsproxy.filter import FIELDS, FilterError, compile_filter

# Completion candidates: field names, then the words the language and common values use.
WORDS: Final = (*FIELDS, "and", "or", "not", "contains", "matches", "in", "denied", "spoofed", "refused",
                "allowed", "request", "response", "rst", "shutdown", "rw", "credit_update", "credit_request",
                "stream", "seqpacket", "http", "tls", "ttrpc")
_LAST_WORD: Final = re.compile(r"[A-Za-z_.]+$")


def complete(text: str) -> str | None:
    """``text`` with its last word completed to a field name or keyword (the first that fits)."""
    m = _LAST_WORD.search(text)
    if not m:
        return None
    part = m.group(0)
    for word in WORDS:
        if word.startswith(part) and word != part:
            return text + word[len(part) :]
    return None


class FieldSuggester(Suggester):
    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        return complete(value)


def check(text: str) -> FilterError | None:
    try:
        compile_filter(text)
    except FilterError as e:
        return e
    return None


class FilterInput(Input):
    BINDINGS = [
        Binding("up", "history(-1)", "Older filter", show=False),
        Binding("down", "history(1)", "Newer filter", show=False),
    ]

    def __init__(self, history: list[str], *, id: str | None = None) -> None:
        super().__init__(placeholder="/ filter: e.g. proto == http and op == rw   (empty: all packets)",
                         suggester=FieldSuggester(), id=id)
        self.history = history
        self._pos: int | None = None

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        pos = len(self.history) if self._pos is None else self._pos
        pos = max(0, min(len(self.history), pos + delta))
        self._pos = pos
        self.value = self.history[pos] if pos < len(self.history) else ""
        self.cursor_position = len(self.value)


class FilterBar(Vertical):
    DEFAULT_CSS = """
    FilterBar { height: auto; }
    FilterBar Input, FilterBar Input:focus { border: none; height: 1; padding: 0 1; }
    FilterBar Input:focus { background: $boost; }
    FilterBar #filter-error { color: $error; height: auto; display: none; padding: 0 1; }
    FilterBar.-bad #filter-error { display: block; }
    """

    class Applied(Message):
        """Enter in the bar, on a filter that compiles."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, history: list[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.history = history
        self.error: FilterError | None = None

    def compose(self) -> ComposeResult:
        yield FilterInput(self.history, id="filter-input")
        yield Static("", id="filter-error")

    @property
    def input(self) -> FilterInput:
        return self.query_one(FilterInput)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.error = check(event.value)
        box = self.query_one("#filter-error", Static)
        if self.error is None:
            self.remove_class("-bad")
            box.update("")
        else:
            self.add_class("-bad")
            # the two lines of FilterError.render(): the text, then carets under the bad token
            box.update(Text(f"{self.error.message}\n{self.error.render()}"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if check(event.value) is not None:
            self.app.bell()
            return
        text = event.value.strip()
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self.input._pos = None
        self.post_message(self.Applied(text))
