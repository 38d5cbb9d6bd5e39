"""HTTP for the serving side (vLLM, Ollama): one request, and retrying one. Standard library only.

Every server lorad talks to is told the same way what to do: a request, retried with
exponential back-off on a connection error or a 5xx (the server may be restarting), final on a
4xx (asking again gets the same answer).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

OUTPUT_CHARS = 2000  # of a response kept in a message or a hook's detail

T = TypeVar("T")


class HttpError(Exception):
    """A request that failed: the message names the method, path and why.

    ``status`` is the HTTP status (None when the server was not reached), ``text`` the start
    of the response body; ``final`` is true for a 4xx, which no retry would change.
    """

    def __init__(self, message: str, status: int | None = None, text: str = ""):
        super().__init__(message)
        self.status, self.text = status, text

    @property
    def final(self) -> bool:
        return self.status is not None and self.status < 500


def bearer(api_key_env: str) -> dict[str, str]:
    """The Authorization header for the token in ``$api_key_env`` ({} when unset or empty)."""
    key = os.environ.get(api_key_env) if api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def send(url: str, method: str, path: str, body: dict | bytes | Path | None = None, *,
         headers: dict[str, str] | None = None, timeout: float) -> str:
    """One request; the response text (its first OUTPUT_CHARS).

    Args:
        body: a JSON object, raw bytes, or a file whose bytes are streamed as the body.

    Raises:
        HttpError: an HTTP error status, or the server could not be reached.
    """
    headers = dict(headers or {})
    data = body
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, Path):
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Content-Length"] = str(body.stat().st_size)
        data = open(body, "rb")  # noqa: SIM115 - streamed, closed below
    request = urllib.request.Request(url.rstrip("/") + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")[:OUTPUT_CHARS]
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")[:OUTPUT_CHARS]
        raise HttpError(f"{method} {path}: HTTP {e.code}: {text}", e.code, text) from None
    except (urllib.error.URLError, OSError) as e:
        raise HttpError(f"{method} {path}: {getattr(e, 'reason', e)}") from None
    finally:
        if hasattr(data, "close"):
            data.close()


def retrying(call: Callable[[], T], *, retries: int, backoff: float,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, again after backoff * 2**n seconds while it raises a HttpError that is not
    final, ``retries`` times at most.

    Raises:
        HttpError: the final one at once; the last one, with "(after N attempts)", when the
            retries ran out.
    """
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            return call()
        except HttpError as e:
            if e.final:
                raise
            last = e
    raise HttpError(f"{last} (after {retries + 1} attempts)", last.status, last.text)
