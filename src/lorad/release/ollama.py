"""Publishing a version to an Ollama server through its HTTP API.

For a promoted (or rolled-back-to) version: upload the version's adapter.gguf as a blob
(``HEAD /api/blobs/sha256:<hex>``, then ``POST`` the bytes when the server lacks it), upload
the base GGUF the same way when the base is a file (an Ollama model name is used as ``from``),
``POST /api/create`` the model ``<prefix>-<version>`` with ``adapters`` (``stream: false``), then
``POST /api/copy`` it to the stable alias ``<prefix>:latest``. Ollama 0.34.1 stopped creating
models with adapters (ollama/ollama#14969: its CLI refuses ``ADAPTER``), so the model can be
created from the version's merged.gguf instead (``files`` alone, no ``adapters``): the mode
``merged``, or ``auto``, which asks ``GET /api/version`` and takes the adapter route only from
a server it knows to be older (and falls back to merged.gguf when that server refuses it).
When no version serves any more (a revert to the bare base) the alias is created from the base
alone. Versions are immutable, so creating one again (a retry, a rollback) makes the same
model. Models of versions the registry made and has since pruned are deleted (``GET
/api/tags``, ``DELETE /api/delete``) at the next publish; a second lorad using the same prefix
on the server keeps its own.

Every request is retried on connection errors and 5xx with exponential back-off; a 4xx is
final. Torch-free; only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorad.config import PublishSettings as _Defaults
from lorad.release import http_client
from lorad.release.gguf import ADAPTER_FILE, MERGED_FILE, merged_problem
from lorad.release.registry import VERSION_RE

_VERSION_ANY_CASE = re.compile(VERSION_RE.pattern, re.IGNORECASE)  # Ollama may list names lowercased

# The first Ollama whose create refuses adapters (ollama/ollama#14969, merged 2026-09-15).
ADAPTERS_REFUSED_FROM = (0, 34, 1)

_digests: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> "sha256:<hex>" (bases are GBs)


class OllamaError(Exception):
    """The Ollama server refused a request or could not be reached; the message says which and why.

    ``answered`` is true when the server answered (an HTTP error status, or an error in the
    reply), false when it could not be reached or the request was cancelled.
    """

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


def route_for(server_version: str | None) -> str:
    """``"adapter"`` or ``"merged"``: how ``auto`` creates a version on a server of ``server_version``.

    The adapter route only for a version known to be below 0.34.1; anything else (0.34.1 and
    later, their release candidates, a development build's 0.0.0, no version at all) takes
    merged.gguf, which every Ollama creates a model from.
    """
    found = re.match(r"v?(\d+)\.(\d+)\.(\d+)", server_version or "")
    if found is None:
        return "merged"
    number = tuple(int(part) for part in found.groups())
    return "adapter" if (0, 0, 0) < number < ADAPTERS_REFUSED_FROM else "merged"


def blob_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, as Ollama names blobs (cached while the file is unchanged)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = f"sha256:{h.hexdigest()}"
    return _digests[key]


@dataclass(frozen=True)
class Ollama:
    """One Ollama server and how lorad names its models there.

    Args:
        url: the server, e.g. http://127.0.0.1:11434.
        base: an absolute path to the base .gguf file (uploaded as a blob), or an Ollama model.
        name_prefix: models are ``<prefix>-<version>``; the alias is ``<prefix>:latest``.
        timeout: seconds for each request as a whole (an uploaded file adds its size at
            ``http_client.UPLOAD_BYTES_PER_S``).
        retries, backoff: retries after the first attempt, waiting backoff * 2**n seconds.
        sleep: how to wait between attempts (None: time.sleep, cut short by ``cancel``).
        cancel: once set, the request waiting stops (``OllamaError``, cancelled) and none follows.
        mode: ``adapter`` (the base + adapter.gguf), ``merged`` (merged.gguf) or ``auto``
            (:func:`route_for` the server's version; merged.gguf when the adapter is refused).
    """

    url: str
    base: str
    name_prefix: str = _Defaults.name_prefix
    timeout: float = _Defaults.timeout
    retries: int = _Defaults.retries
    backoff: float = _Defaults.backoff
    sleep: Callable[[float], None] | None = field(default=None, repr=False, compare=False)
    cancel: threading.Event | None = field(default=None, repr=False, compare=False)
    mode: str = _Defaults.ollama_mode

    def model_name(self, version: str) -> str:
        return f"{self.name_prefix}-{version}"

    @property
    def alias(self) -> str:
        return f"{self.name_prefix}:latest"

    def publish(self, version: str | None, root: Path) -> tuple[bool, str]:
        """(ok, detail): make ``version`` the alias's model (None: the bare base)."""
        try:
            if version is None:
                self.create(self.alias)
                return True, f"{self.alias} is the base model {self.base}"
            name = self.model_name(version)
            how = self.create_version(name, root, version)
            self.request("POST", "/api/copy", {"source": name, "destination": self.alias})
            return True, f"created {name} {how}; {self.alias} -> {name}"
        except OllamaError as e:
            return False, str(e)

    def create_version(self, name: str, root: Path, version: str) -> str:
        """Create the model ``name`` of ``version`` by this hook's mode; says how it was made.

        Raises:
            OllamaError: a request failed, or the version lacks the file its route needs.
        """
        route, server = self.mode, ""
        if self.mode == "auto":
            found = self.server_version()
            route, server = route_for(found), f"Ollama {found or 'of unknown version'}: "
        refused = None
        if route == "adapter":
            adapter = root / version / ADAPTER_FILE
            if not adapter.is_file():
                raise OllamaError(f"{version} has no {ADAPTER_FILE} to upload (see the gguf_export_refused event)")
            try:
                self.create(name, adapter=adapter)
                return f"({server}the base + {ADAPTER_FILE})"
            except OllamaError as e:
                if self.mode != "auto" or not e.answered:
                    if e.answered and "adapter" in str(e).lower():
                        raise OllamaError(
                            f'{e} (Ollama 0.34.1 and later create no models with adapters: set ollama_mode = "auto" '
                            'or "merged")',
                            answered=True,
                        ) from None
                    raise
                refused = e
        problem = merged_problem(root, version)
        if problem is not None:
            raise OllamaError(problem + (f"; and the adapter route was refused: {refused}" if refused else ""))
        self.create(name, merged=root / version / MERGED_FILE)
        if refused is not None:
            return f"({server}the adapter route was refused ({refused}); from {MERGED_FILE})"
        return f"({server}from {MERGED_FILE})"

    def server_version(self) -> str | None:
        """What ``GET /api/version`` says, or None when the server has no such endpoint or its
        answer is not ``{"version": "..."}``.

        Raises:
            OllamaError: the server could not be reached (after the retries) or the request was cancelled.
        """
        try:
            text = self.request("GET", "/api/version", missing_ok=True)
        except OllamaError as e:
            if e.answered:
                return None
            raise
        try:
            reply = json.loads(text or "")
        except (ValueError, RecursionError):
            return None
        found = reply.get("version") if isinstance(reply, dict) else None
        return found if isinstance(found, str) else None

    def prune(self, kept: set[str], made: set[str]) -> list[str]:
        """Delete the version models (``<prefix>-<version>``) of versions this registry made
        (``made``) and no longer holds (not in ``kept``); returns their names. The alias, models
        of other names, and models of versions another registry made under the same prefix (a
        second lorad on this server) are never touched.

        Raises:
            OllamaError: listing or deleting failed after its retries, or the listing is not
                ``{"models": [{"name": ...}, ...]}``.
        """
        kept = {k.lower() for k in kept}  # Ollama matches model names case-insensitively
        made = {m.lower() for m in made}
        doomed = []
        for name in self._model_names():
            base, _, tag = name.partition(":")
            version = base[len(self.name_prefix) + 1 :] if base.startswith(self.name_prefix + "-") else ""
            if (
                tag in ("", "latest")
                and _VERSION_ANY_CASE.match(version)
                and version.lower() in made
                and version.lower() not in kept
            ):
                doomed.append(name)
        for name in doomed:
            self.request("DELETE", "/api/delete", {"model": name}, missing_ok=True)
        return doomed

    def _model_names(self) -> list[str]:
        """The names ``GET /api/tags`` lists.

        Raises:
            OllamaError: the request failed, or its answer is not the listing Ollama gives.
        """
        text = self.request("GET", "/api/tags") or ""
        try:
            tags = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError) as e:  # cut, not JSON, nested past the parser
            raise OllamaError(f"GET /api/tags: not JSON ({type(e).__name__}): {text[:120]!r}") from None
        models = (tags.get("models") or []) if isinstance(tags, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise OllamaError(f"GET /api/tags: not a list of models: {text[:120]!r}")
        return [str(m.get("name") or m.get("model") or "") for m in models]

    def create(self, model: str, adapter: Path | None = None, merged: Path | None = None) -> None:
        """POST /api/create for ``model``: from ``merged`` (a whole model GGUF) alone, else from the
        base (+ the adapter); blobs uploaded first.

        Raises:
            OllamaError: a request failed after its retries, or the server said it failed.
        """
        body: dict = {"model": model, "stream": False}
        if merged is not None:
            body["files"] = {merged.name: self.upload(merged)}
        elif self.base.endswith(".gguf"):
            body["files"] = {Path(self.base).name: self.upload(Path(self.base))}
        else:
            body["from"] = self.base
        if adapter is not None:
            body["adapters"] = {adapter.name: self.upload(adapter)}
        text = self.request("POST", "/api/create", body) or ""
        try:
            reply = json.loads(text) if text.strip() else {}
        except ValueError:
            reply = {}
        if isinstance(reply, dict) and (reply.get("error") or reply.get("status", "success") != "success"):
            raise OllamaError(f"create {model}: {reply.get('error') or reply.get('status')}", answered=True)

    def upload(self, path: Path) -> str:
        """The blob digest of ``path``, pushed to the server unless it has it already."""
        digest = blob_digest(path)
        if self.request("HEAD", f"/api/blobs/{digest}", missing_ok=True) is None:
            self.request("POST", f"/api/blobs/{digest}", path)
        return digest

    def request(
        self, method: str, path: str, body: dict | Path | None = None, *, missing_ok: bool = False
    ) -> str | None:
        """The response text of one request, retried on connection errors and 5xx.

        Args:
            body: a JSON object, or a file whose bytes are the body.
            missing_ok: a 404 answers None instead of failing.

        Raises:
            OllamaError: a 4xx (other than a tolerated 404), or the retries ran out.
        """
        try:
            return http_client.retrying(
                lambda: http_client.send(self.url, method, path, body, timeout=self.timeout, cancel=self.cancel),
                retries=self.retries,
                backoff=self.backoff,
                sleep=self.sleep,
                cancel=self.cancel,
            )
        except http_client.HttpError as e:
            if e.status == 404 and missing_ok:
                return None
            answered = e.status is not None and not isinstance(e, http_client.Cancelled)
            raise OllamaError(str(e), answered=answered) from None
