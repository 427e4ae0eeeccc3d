"""Errors of the remote host and client, each with an HTTP status, a code and a message.

The host answers every refused request with JSON ``{"error": {"code", "message", "field"}}``
and a 4xx status; :class:`ApiError` is that answer before it is sent, and
:class:`RemoteError` is the same answer as the client raises it. Codes are stable strings a
program can branch on (``invalid_plan``, ``identity_mismatch``, ``queue_full``, ...).
"""

from __future__ import annotations

from typing import Any

from torchsurgeon.surgery.errors import SurgeryError

__all__ = ["ApiError", "RemoteError"]


class ApiError(Exception):
    """A refused request: HTTP ``status``, stable ``code``, readable ``message``, ``field``."""

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def to_record(self) -> dict[str, Any]:
        """The error with its status, as plain JSON: how a worker, replica or rank reports
        it to the host (read back with :meth:`from_record`)."""
        return {"status": self.status, **self.to_json()["error"]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ApiError:
        return cls(record["status"], record["code"], record["message"], record.get("field", ""))


class RemoteError(SurgeryError, RuntimeError):
    """What the host refused or what failed there, raised by the client."""

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"{code} (HTTP {status}){where}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
