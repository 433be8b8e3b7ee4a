"""Errors a caller can act on. Each message names the limit that was hit and the fix."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request cannot be served as asked; ``param`` names the offending field (or None).

    The server turns it into an OpenAI-style 400 error.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
