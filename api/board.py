"""Unit and bed listings for the boards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from api.app import ApiContext


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add this module's routes to the app (being built in this issue)."""
