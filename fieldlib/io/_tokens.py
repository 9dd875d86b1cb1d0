"""A whitespace token stream that remembers each token's line, for clear parse errors.

Readers of the text formats (UAI, libDAI .fg) pull integers, floats and runs of table values
from one :class:`Tokens`; every error names the file, the line, what was being read and what
was expected (:class:`~fieldlib.errors.FormatError`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fieldlib.errors import FormatError

__all__ = ["Tokens", "read_text"]


def read_text(path) -> str:
    """The text of ``path``; a missing or unreadable file is a FormatError naming it."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the file ({exc})") from None


class Tokens:
    """Whitespace-separated tokens of ``text`` with their 1-based line numbers.

    Args:
        text: the file's contents.
        where: the file name used in error messages.
        comments: lines whose first non-blank character is ``#`` are skipped (libDAI .fg).
    """

    def __init__(self, text: str, where: str, comments: bool = False):
        self.where = str(where)
        self.tokens: list[str] = []
        self.lines: list[int] = []
        self.last_line = 0
        for number, line in enumerate(text.splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if comments and parts[0].startswith("#"):
                continue
            self.tokens.extend(parts)
            self.lines.extend([number] * len(parts))
            self.last_line = number
        self.pos = 0

    # -- positions and errors -----------------------------------------------------------
    def line(self, pos: int | None = None) -> int:
        pos = self.pos if pos is None else pos
        return self.lines[pos] if pos < len(self.lines) else self.last_line

    def error(self, message: str, pos: int | None = None) -> FormatError:
        """A FormatError ``FILE:LINE: message`` at token ``pos`` (default: the next one)."""
        return FormatError(f"{self.where}:{self.line(pos)}: {message}")

    def truncated(self, what: str) -> FormatError:
        return FormatError(
            f"{self.where}: the file ends (after line {self.last_line}) while reading {what}; "
            f"it is truncated or a count above is wrong"
        )

    @property
    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    def peek(self) -> str | None:
        return None if self.done else self.tokens[self.pos]

    # -- reading ------------------------------------------------------------------------
    def word(self, what: str) -> str:
        if self.done:
            raise self.truncated(what)
        self.pos += 1
        return self.tokens[self.pos - 1]

    def integer(self, what: str, low: int | None = 0, high: int | None = None) -> int:
        """The next token as an int in ``low..high`` (either bound may be None)."""
        token = self.word(what)
        try:
            value = int(token)
        except ValueError:
            raise self.error(f"expected {what} (an integer), got {token!r}",
                             self.pos - 1) from None
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "" if low is None else str(low)
            hi = "" if high is None else str(high)
            raise self.error(f"expected {what} in {lo}..{hi}, got {value}", self.pos - 1)
        return value

    def number(self, what: str) -> float:
        """The next token as a float (``float()`` syntax: exponents, inf, nan)."""
        token = self.word(what)
        try:
            return float(token)
        except ValueError:
            raise self.error(f"expected {what} (a number), got {token!r}",
                             self.pos - 1) from None

    def values(self, count: int, what: str) -> np.ndarray:
        """The next ``count`` tokens as non-negative finite floats, ``float64 (count,)``.

        Errors name the entry (``entry k of count``) and its line: a non-number, a negative
        value, NaN or infinity, and a file that ends early.
        """
        start = self.pos
        if start + count > len(self.tokens):
            have = len(self.tokens) - start
            raise self.truncated(f"{what} ({have} of {count} values present)")
        chunk = self.tokens[start:start + count]
        try:
            out = np.array(chunk, dtype=np.float64)
        except ValueError:
            for k, token in enumerate(chunk):
                try:
                    float(token)
                except ValueError:
                    raise self.error(
                        f"{what}, entry {k} of {count}: expected a number, got {token!r}",
                        start + k) from None
            raise  # pragma: no cover - numpy rejected something float() accepts
        bad = ~np.isfinite(out) | (out < 0)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            value = out[k]
            kind = "NaN" if math.isnan(value) else ("negative" if value < 0 else "infinite")
            raise self.error(
                f"{what}, entry {k} of {count}: the value {chunk[k]} is {kind}; expected a "
                f"finite non-negative potential", start + k)
        self.pos += count
        return out

    def expect_end(self, what: str) -> None:
        """Raise when tokens remain after ``what`` (a count above was too small)."""
        if not self.done:
            raise self.error(
                f"unexpected {self.peek()!r} after {what}; expected the end of the file "
                f"(a count above is too small?)")
