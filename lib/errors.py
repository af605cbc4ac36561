"""HTTP errors for bad requests.

MONAI Label 0.8.5 has no exception handler of its own: any exception raised by an infer task, a
datastore call or a strategy ends as ``500 Internal Server Error``. FastAPI turns an
``HTTPException`` raised anywhere below an endpoint into a response with that status code and
``{"detail": message}``, so the app raises these for everything that is the client's fault.
"""

from __future__ import annotations

from fastapi import HTTPException

__all__ = ["HTTPException", "bad_request", "unprocessable", "not_found", "conflict", "server_error"]


def bad_request(message: str) -> HTTPException:
    """400: malformed parameters (wrong type or shape of a field)."""
    return HTTPException(status_code=400, detail=message)


def unprocessable(message: str) -> HTTPException:
    """422: well-formed but unusable content (unknown ROI, label of the wrong shape, unreadable file)."""
    return HTTPException(status_code=422, detail=message)


def not_found(message: str) -> HTTPException:
    """404: unknown image id, strategy, ..."""
    return HTTPException(status_code=404, detail=message)


def conflict(message: str) -> HTTPException:
    """409: the request clashes with the server's state (training already running, nothing to train on)."""
    return HTTPException(status_code=409, detail=message)


def server_error(message: str) -> HTTPException:
    """500 with a message: the server's own state is broken (e.g. an unreadable model file)."""
    return HTTPException(status_code=500, detail=message)
