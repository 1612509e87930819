"""Errors the records layer raises for requests it refuses (callers map them to 404, 409 or a CLI message)."""

from __future__ import annotations


class RecordsError(Exception):
    """A request the records refuse; the message says why."""


class NotFoundError(RecordsError):
    """The thing named does not exist (or not in the caller's site)."""


class ConflictError(RecordsError):
    """The thing exists already, or belongs to another site."""
