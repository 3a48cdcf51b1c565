"""The service's answer to a bad request: an HTTP status and a reason (``serving/app.py`` renders it)."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers
