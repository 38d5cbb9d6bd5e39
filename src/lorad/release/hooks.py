"""Publish hooks: tell the serving side whenever ``current`` moves (promotion or rollback).

Two kinds, configured as ``[[publish]]`` tables and run in order:

- ``command``: an argv with ``{version}``, ``{path}`` and ``{previous}`` placeholders (the new
  version, its directory, the version it replaces or ""), run with a timeout; exit 0 = done.
  ``$LORAD_ACTION`` says promoted, rolled_back or reverted.
- ``vllm``: POST ``/v1/load_lora_adapter`` with the new versioned name (``<prefix>-<version>``)
  and path, then ``/v1/unload_lora_adapter`` for the name it replaces; each request retried
  with exponential backoff. Versions are immutable, so a name always means the same weights.

A failed hook (one that raises included) is recorded (audit event ``publish_failed``) and reported; it leaves the
pointer where it is unless the hook is ``required``, in which case the registry is reverted
to what it was before (and the hooks run once more so the server follows it back).

Every hook is bounded (its ``timeout``: each HTTP request as a whole, a command's run) and
takes a ``cancel`` event: once set (``lorad cancel`` of a job whose conclusion waits on a hook),
the hook stops waiting within ``http_client.CANCEL_POLL`` seconds and fails as cancelled; the
report says so (``cancelled``, event ``publish_cancelled``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorad import events, log
from lorad.config import PublishSettings as _Defaults
from lorad.release import http_client
from lorad.release.registry import Change, Registry

OUTPUT_CHARS = http_client.OUTPUT_CHARS


@dataclass(frozen=True)
class HookResult:
    """How one hook went."""

    hook: str
    ok: bool
    required: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return {"hook": self.hook, "ok": self.ok, "required": self.required, "detail": self.detail}


@dataclass(frozen=True)
class CommandHook:
    """Run an argv; placeholders {version}, {path}, {previous}."""

    argv: tuple[str, ...]
    timeout: float = _Defaults.timeout
    required: bool = _Defaults.required

    @property
    def name(self) -> str:
        return f"command {Path(self.argv[0]).name if self.argv else '?'}"

    def run(self, change: Change, root: Path, cancel: threading.Event | None = None) -> HookResult:
        values = {
            "version": change.version or "",
            "previous": change.replaced or "",
            "path": str((root / change.version).resolve()) if change.version else "",
        }
        try:
            argv = [part.format(**values) for part in self.argv]
        except (KeyError, IndexError, ValueError) as e:
            return HookResult(self.name, False, self.required, f"bad placeholder in argv: {e}")
        env = dict(os.environ, LORAD_ACTION=change.action)
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as e:
            return HookResult(self.name, False, self.required, f"could not run: {e}")
        started = time.monotonic()
        while True:
            left = started + self.timeout - time.monotonic()
            try:
                stdout, stderr = proc.communicate(
                    timeout=max(0.0, min(left, http_client.CANCEL_POLL) if cancel else left)
                )
                break
            except subprocess.TimeoutExpired:
                cancelled = cancel is not None and cancel.is_set()
                if cancelled or time.monotonic() - started >= self.timeout:
                    proc.kill()
                    proc.communicate()
                    why = (
                        f"cancelled after {time.monotonic() - started:.1f} s"
                        if cancelled
                        else f"timed out after {self.timeout:g}s"
                    )
                    return HookResult(self.name, False, self.required, why)
        output = (stdout.strip() + "\n" + stderr.strip()).strip()[:OUTPUT_CHARS]
        if proc.returncode != 0:
            return HookResult(self.name, False, self.required, f"exit {proc.returncode}: {output}")
        return HookResult(self.name, True, self.required, output)


@dataclass(frozen=True)
class VllmHook:
    """Load the new adapter into a vLLM server by a versioned name, then unload the old one."""

    url: str
    name_prefix: str = _Defaults.name_prefix
    api_key_env: str = _Defaults.api_key_env
    timeout: float = _Defaults.timeout
    retries: int = _Defaults.retries
    backoff: float = _Defaults.backoff
    required: bool = _Defaults.required
    sleep: Callable[[float], None] | None = field(default=None, repr=False, compare=False)  # None: time.sleep

    @property
    def name(self) -> str:
        return f"vllm {self.url}"

    def adapter_name(self, version: str) -> str:
        return f"{self.name_prefix}-{version}"

    def run(self, change: Change, root: Path, cancel: threading.Event | None = None) -> HookResult:
        notes = []
        if change.version:
            ok, text = self._post(
                "/v1/load_lora_adapter",
                {"lora_name": self.adapter_name(change.version), "lora_path": str((root / change.version).resolve())},
                tolerate="already been loaded",
                cancel=cancel,
            )
            if not ok:
                return HookResult(self.name, False, self.required, f"load failed: {text}")
            notes.append(f"loaded {self.adapter_name(change.version)}")
        if change.replaced and change.replaced != change.version:
            ok, text = self._post(
                "/v1/unload_lora_adapter",
                {"lora_name": self.adapter_name(change.replaced)},
                tolerate="cannot be found",
                cancel=cancel,
            )
            # The new adapter is serving; an old one left loaded costs memory, not correctness.
            notes.append(
                f"unloaded {self.adapter_name(change.replaced)}"
                if ok
                else f"unload of {self.adapter_name(change.replaced)} failed: {text}"
            )
        return HookResult(self.name, True, self.required, "; ".join(notes))

    def _post(self, path: str, body: dict, tolerate: str, cancel: threading.Event | None) -> tuple[bool, str]:
        """(ok, response or why): retried on connection errors and 5xx; a 4xx is final, and
        an error whose body says ``tolerate`` counts as done."""
        try:
            return True, http_client.retrying(
                lambda: http_client.send(
                    self.url,
                    "POST",
                    path,
                    body,
                    headers=http_client.bearer(self.api_key_env),
                    timeout=self.timeout,
                    cancel=cancel,
                ),
                retries=self.retries,
                backoff=self.backoff,
                sleep=self.sleep,
                cancel=cancel,
            )
        except http_client.HttpError as e:
            return (True, e.text) if tolerate in e.text else (False, str(e))


@dataclass(frozen=True)
class GgufHook:
    """The version's adapter.gguf and Modelfile (written when it was made) are there to serve."""

    required: bool = _Defaults.required
    name: str = "gguf"

    def run(self, change: Change, root: Path, cancel: threading.Event | None = None) -> HookResult:
        from lorad.release.gguf import check_version

        ok, detail = check_version(root, change.version)
        return HookResult(self.name, ok, self.required, detail)


@dataclass(frozen=True)
class OllamaHook:
    """Create ``<prefix>-<version>`` in Ollama from the base and adapter.gguf, or from merged.gguf
    (``mode``: adapter, merged, auto); move ``<prefix>:latest``; delete the models of versions the
    registry no longer holds."""

    url: str
    base: str
    name_prefix: str = _Defaults.name_prefix
    timeout: float = _Defaults.timeout
    retries: int = _Defaults.retries
    backoff: float = _Defaults.backoff
    required: bool = _Defaults.required
    mode: str = _Defaults.ollama_mode
    sleep: Callable[[float], None] | None = field(default=None, repr=False, compare=False)  # None: time.sleep

    @property
    def name(self) -> str:
        return f"ollama {self.url}"

    def run(self, change: Change, root: Path, cancel: threading.Event | None = None) -> HookResult:
        from lorad.release.ollama import Ollama, OllamaError

        server = Ollama(
            self.url,
            self.base,
            self.name_prefix,
            self.timeout,
            self.retries,
            self.backoff,
            self.sleep,
            cancel,
            self.mode,
        )
        ok, detail = server.publish(change.version, root)
        if ok:
            # The alias serves; a model of a pruned version left behind costs disk, not
            # correctness, so nothing that goes wrong deleting it fails the hook.
            registry = Registry(root)
            try:
                deleted = server.prune(set(registry.names()), registry.made())
                detail += f"; deleted {', '.join(deleted)} (pruned versions)" if deleted else ""
            except OllamaError as e:
                detail += f"; deleting the models of pruned versions failed: {e}"
            except Exception as e:  # noqa: BLE001 - see above
                detail += f"; deleting the models of pruned versions failed: {type(e).__name__}: {e}"
        return HookResult(self.name, ok, self.required, detail)


Hook = CommandHook | VllmHook | GgufHook | OllamaHook


def hooks_from_settings(tables, training_base_model: str = "") -> list[Hook]:
    """Hooks from the ``[[publish]]`` tables (PublishSettings), in order.

    ``training_base_model`` is the base of gguf/ollama tables that name none (a .gguf file).
    """
    from lorad.release.gguf import table_base

    hooks: list[Hook] = []
    for t in tables:
        if t.kind == "command":
            hooks.append(CommandHook(tuple(t.argv), t.timeout, t.required))
        elif t.kind == "gguf":
            hooks.append(GgufHook(t.required))
        elif t.kind == "ollama":
            hooks.append(
                OllamaHook(
                    t.url,
                    table_base(t, training_base_model),
                    t.name_prefix,
                    t.timeout,
                    t.retries,
                    t.backoff,
                    t.required,
                    t.ollama_mode,
                )
            )
        else:
            hooks.append(VllmHook(t.url, t.name_prefix, t.api_key_env, t.timeout, t.retries, t.backoff, t.required))
    return hooks


@dataclass
class PublishReport:
    """What the hooks did for one change, and whether the change was undone."""

    results: list[HookResult] = field(default_factory=list)
    reverted: Change | None = None
    revert_results: list[HookResult] = field(default_factory=list)
    cancelled: bool = False  # the cancel event was set: hooks still waiting stopped and failed

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "results": [r.as_dict() for r in self.results],
            "reverted": self.reverted.as_dict() if self.reverted else None,
            "revert_results": [r.as_dict() for r in self.revert_results],
            "cancelled": self.cancelled,
        }


def run_all(hooks: list[Hook], change: Change, root: Path, cancel: threading.Event | None = None) -> list[HookResult]:
    """Each hook's result, in order; a hook that raises is a failed hook, never an exception here.

    Why: hooks run after ``current`` has moved. An exception escaping here (an empty argv's
    IndexError, a URL urllib cannot parse) failed the whole job with the pointer moved, the
    audit saying promoted, and a required hook's revert never done.
    """
    results = []
    for hook in hooks:
        if cancel is not None and cancel.is_set():
            results.append(HookResult(hook.name, False, hook.required, "cancelled before it ran"))
            continue
        try:
            results.append(hook.run(change, Path(root), cancel))
        except Exception as e:
            results.append(HookResult(hook.name, False, hook.required, f"raised {type(e).__name__}: {e}"))
    return results


def publish(
    registry: Registry,
    change: Change,
    hooks: list[Hook],
    audit: Callable[..., None] | None = None,
    cancel: threading.Event | None = None,
) -> PublishReport:
    """Run every hook for ``change``; revert the registry when a required one failed.

    Args:
        registry: where the change was made (reverted through it if needed).
        change: the promotion or rollback just made.
        hooks: from :func:`hooks_from_settings`.
        audit: ``audit(event, version=..., **detail)`` for failed hooks (``Buffer.record_event``).
        cancel: once set, a hook still waiting stops and fails as cancelled (so does the
            revert's run of the hooks); the report's ``cancelled`` says so.
    """
    logger = log.get("lorad.release.hooks")
    report = PublishReport(run_all(hooks, change, registry.root, cancel))
    if cancel is not None and cancel.is_set():
        report.cancelled = True
        cut = [r.hook for r in report.results if not r.ok]
        logger.warning(events.PUBLISH_CANCELLED, version=change.version, hooks=cut, action=change.action)
        if audit is not None:
            audit(events.PUBLISH_CANCELLED, version=change.version, hooks=cut, action=change.action)
    for r in report.results:
        if r.ok:
            logger.info("adapter_published", version=change.version, hook=r.hook, action=change.action)
            continue
        logger.warning("publish_failed", version=change.version, hook=r.hook, detail=r.detail, required=r.required)
        if audit is not None:
            audit(
                "publish_failed",
                version=change.version,
                hook=r.hook,
                detail=r.detail,
                required=r.required,
                action=change.action,
            )
    failed_required = [r for r in report.results if not r.ok and r.required]
    if failed_required:
        reason = "required publish hook failed: " + "; ".join(f"{r.hook}: {r.detail}" for r in failed_required)
        report.reverted = registry.revert(change, reason=reason)
        logger.warning("adapter_change_reverted", version=report.reverted.version, reason=reason)
        # Let the serving side follow the pointer back (best effort; never reverted again).
        report.revert_results = run_all(hooks, report.reverted, registry.root, cancel)
    return report
