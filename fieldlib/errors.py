"""The exceptions fieldlib raises.

Every error caused by a user's input is a :class:`FieldlibError`, which subclasses
:class:`ValueError`, so ``except ValueError`` keeps working for callers that do not care
which input was wrong. The message always names the offending object (factor, variable,
file and line) and what was expected.
"""

from __future__ import annotations


class FieldlibError(ValueError):
    """Base class of every error fieldlib raises for bad input or an impossible request."""


class ShapeError(FieldlibError):
    """A tensor has the wrong number of dimensions or the wrong size along one of them."""


class CardinalityError(ShapeError):
    """A table's size along a variable's axis differs from that variable's cardinality."""


class UnknownVariableError(FieldlibError, KeyError):
    """A factor or evidence names a variable the graph does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class InvalidPotentialError(FieldlibError):
    """A log-potential holds NaN or +inf (-inf is allowed: it marks an impossible state)."""


class EvidenceError(FieldlibError):
    """Evidence names a state outside a variable's domain, or is malformed."""


class ZeroProbabilityError(FieldlibError):
    """The evidence (or the model itself) has probability zero: log Z is -inf."""


class TooLargeError(FieldlibError):
    """A computation was refused because it would exceed a size or memory budget."""


class UnsupportedQueryError(FieldlibError):
    """An engine was asked for something it cannot give (e.g. MAP from mean-field)."""


class FormatError(FieldlibError):
    """A file could not be parsed; the message names the file, the line or entry, and why."""
