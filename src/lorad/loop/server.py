"""The generator's server: vLLM's CPU build on the base checkpoint, and its OpenAI protocol.

vLLM lives in a virtual environment of its own (``make vllm`` builds ``.venv-vllm``): it pins
a transformers older than lorad's. :class:`VllmServer` starts it on the plain checkpoint lorad
converted from the GGUF, with runtime LoRA loading on, so lorad's ``vllm`` publish hook loads
each promoted version under its versioned name (``lorad-<version>``) while it serves. Every
request here has a whole-request deadline (:mod:`lorad.release.http_client`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorad.release import http_client

# What a generator that sets no max_tokens gets (atomicguard's does not): the server's default.
MAX_NEW_TOKENS = 384


class ServerError(Exception):
    "The server could not start or answer; the message says why and where its log is."


def vllm_python() -> Path | None:
    """The python of vLLM's own environment: ``$LORAD_VLLM_PYTHON``, else ``.venv-vllm`` beside
    this environment (the checkout's, as ``make vllm`` builds it), else None."""
    named = os.environ.get("LORAD_VLLM_PYTHON")
    if named:
        return Path(named)
    candidate = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() else None


@dataclass
class VllmServer:
    """A vLLM OpenAI server (CPU build) on ``model_dir``, serving it as ``served_name``."""

    python: Path
    model_dir: str
    port: int
    log_path: Path
    served_name: str = "base"
    max_lora_rank: int = 8
    max_loras: int = 4
    max_new_tokens: int = MAX_NEW_TOKENS
    dtype: str = "bfloat16"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        # `python -m` because the `vllm` script looks its version up under the wrong
        # distribution name in the CPU build.
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            str(self.max_loras),
            "--dtype",
            self.dtype,
            "--max-model-len",
            "2048",
            "--override-generation-config",
            json.dumps({"max_new_tokens": self.max_new_tokens}),
        ]

    def start(self, timeout: float = 600.0) -> float:
        """Start the server and wait until it lists its model; returns the seconds it took.

        Raises:
            ServerError: it exited, or did not answer within ``timeout``.
        """
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            HF_HUB_OFFLINE="1",
            VLLM_TARGET_DEVICE="cpu",
            VLLM_NO_USAGE_STATS="1",
        )
        t0 = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise ServerError(
                    f"vLLM exited with code {self.process.returncode} while starting; see {self.log_path}"
                )
            try:
                if self.served_name in models(self.url):
                    return time.monotonic() - t0
            except http_client.HttpError:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM did not answer within {timeout:g} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM its process group (the engine core is a child), SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def models(url: str, timeout: float = 10.0) -> list[str]:
    """The model names the server serves now (the base, and each LoRA adapter loaded)."""
    body = json.loads(http_client.send(url, "GET", "/v1/models", timeout=timeout))
    return [m["id"] for m in body.get("data", [])]


def chat(
    url: str,
    model: str,
    messages: list[dict],
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    timeout: float = 300.0,
) -> str:
    """One chat completion's text."""
    body: dict = {"model": model, "messages": messages, "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    reply = json.loads(http_client.send(url, "POST", "/v1/chat/completions", body, timeout=timeout))
    return reply["choices"][0]["message"]["content"] or ""


def samples(
    url: str, model: str, messages: list[dict], *, n: int, temperature: float, max_tokens: int, timeout: float = 600.0
) -> list[str]:
    """``n`` sampled completions of one prompt (one request)."""
    body = {"model": model, "messages": messages, "n": n, "temperature": temperature, "max_tokens": max_tokens}
    reply = json.loads(http_client.send(url, "POST", "/v1/chat/completions", body, timeout=timeout))
    return [c["message"]["content"] or "" for c in reply["choices"]]


def load_adapter(url: str, name: str, path: Path, timeout: float = 120.0) -> None:
    """Load a peft adapter directory under ``name`` (what lorad's vllm hook does on promotion)."""
    http_client.send(url, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, timeout=timeout)


def unload_adapter(url: str, name: str, timeout: float = 60.0) -> None:
    http_client.send(url, "POST", "/v1/unload_lora_adapter", {"lora_name": name}, timeout=timeout)
