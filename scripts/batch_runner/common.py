"""Errors and small helpers shared by the batch runner's modules."""
from __future__ import annotations

import http.client
import socket
import time
import urllib.error

from comfy_server import ComfyServerError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class BatchError(Exception):
    """Something the user can fix before any job runs: printed as one message, no traceback."""


def is_network_error(e: BaseException) -> bool:
    """The server did not answer (refused, reset, timed out); an HTTP error status is an answer, not this."""
    if isinstance(e, urllib.error.HTTPError):
        return False
    return isinstance(e, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                          http.client.HTTPException))


def refused(e: BaseException) -> bool:
    """Nothing listens at the address: the server is gone, not busy."""
    return isinstance(getattr(e, "reason", e), ConnectionRefusedError)


def one_line(error) -> str:
    """An error without the server's traceback, on one line."""
    text = str(error).split("\nServer traceback:")[0]
    return " ".join(l.strip() for l in text.splitlines() if l.strip())


def describe_error(e: BaseException) -> str:
    """A job's error for the manifest: the server's own message, or what went wrong with its answer."""
    if isinstance(e, ComfyServerError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
