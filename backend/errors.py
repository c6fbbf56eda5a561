"""The one error type the engine raises for bad input or state, with the HTTP status to show."""

from __future__ import annotations

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """Bad input or state, with the HTTP status a caller should see."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
