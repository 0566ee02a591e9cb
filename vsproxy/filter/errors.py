"""The filter language's one error: ``FilterError``, which points at the bad token."""

from __future__ import annotations


class FilterError(ValueError):
    """A filter that does not parse or does not type-check.

    ``column`` is the 0-based offset of ``token`` in ``text``; at the end of the text the
    column is ``len(text)`` and the token is empty.
    """

    def __init__(self, message: str, text: str, column: int, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.column = column
        self.token = token

    def __str__(self) -> str:
        return f"{self.message} (column {self.column})"

    def render(self) -> str:
        """Two lines: the filter, then carets under the bad token."""
        # Tabs and newlines become spaces so the caret line stays aligned with the text.
        line = self.text.translate(_FLATTEN)
        return f"{line}\n{' ' * self.column}{'^' * max(1, len(self.token))}"


_FLATTEN = str.maketrans("\t\n\r\v\f", "     ")
