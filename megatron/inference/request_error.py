"""The one error a server request can end in: what was wrong (naming the field) and the HTTP status (4xx).

The endpoints turn it into the reply (400 unless said otherwise); the server itself keeps running.
"""

from __future__ import annotations

from megatron.errors import MegatronError


class RequestError(MegatronError, ValueError):
    """A request the server refuses; `field` names the request field at fault (None for the whole body)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
