"""A PEFT LoRA adapter written as a llama.cpp GGUF LoRA adapter (and an Ollama Modelfile).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` makes and ``llama_adapter_lora_init``
reads: metadata ``general.type = adapter``, ``general.architecture`` (the base's),
``adapter.type = lora`` and ``adapter.lora.alpha``; for every adapted weight two tensors named
after llama.cpp's tensor map, ``blk.N.attn_q.weight.lora_a`` (rank x in) and ``.lora_b``
(out x rank). llama.cpp applies ``alpha / rank`` to ``lora_b @ lora_a`` on top of its own copy
of the weight, so whatever transform its converter applied to that weight is applied to the
adapter too: for Llama (and Mistral) the rows of ``q_proj``/``k_proj`` are permuted for its rope
layout, and a row permutation of ``B @ A`` is the same permutation of ``B``.

Torch-free (numpy and the ``gguf`` package): the daemon writes it when a version is made. What
llama.cpp cannot load the same way is refused with the reason, never written in part: DoRA,
``modules_to_save``, embedding or lm_head LoRA, bias or other extra tensors, per-module alphas
that one ``adapter.lora.alpha`` cannot express, an architecture not in :data:`ARCHITECTURES`,
a base GGUF whose architecture or tensor shapes differ.

The same plan also gives the merged model (:func:`write_merged`): a copy of the base GGUF, its
metadata and every tensor, in which each adapted weight W is replaced by ``W + alpha / rank *
lora_b @ lora_a`` in llama.cpp's layout (a quantized W dequantized first and the sum written
unquantized), for servers that no longer take adapters (Ollama from 0.34.1 refuses ``ADAPTER``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorad import durable

if TYPE_CHECKING:
    import numpy as np

    from lorad.release.registry import Registry

ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "merged.gguf"  # the adapter merged into the base: a whole model
MODELFILE = "Modelfile"
PUBLISH_KINDS = ("gguf", "ollama")  # the [[publish]] kinds that need the GGUF in the version


class ExportRefused(Exception):
    "The adapter cannot be written as a GGUF LoRA adapter; the message says why."


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter treats one Hugging Face architecture."""

    gguf_arch: str  # general.architecture, gguf.MODEL_ARCH_NAMES
    permute_qk: bool  # q_proj/k_proj rows reordered for llama.cpp's (non-NeoX) rope


# The Hugging Face architectures (config.json "architectures") this writer supports.
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", True),
    "MistralForCausalLM": Architecture("llama", True),
    "Qwen2ForCausalLM": Architecture("qwen2", False),
}

# peft's saved key for a LoRA factor: base_model.model.<module path>.lora_A.weight
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_NOT_EXPORTABLE_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Export:
    """What was written: the file, its sha256 and what it holds."""

    path: Path
    sha256: str
    arch: str
    alpha: float
    rank: int
    tensors: int  # lora_a + lora_b tensors

    def as_dict(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "arch": self.arch,
            "alpha": self.alpha,
            "rank": self.rank,
            "tensors": self.tensors,
        }


@dataclass(frozen=True)
class MergedExport:
    """The merged model written: the file, its sha256, how many weights took the adapter."""

    path: Path
    sha256: str
    arch: str
    merged: int  # weights replaced by W + scale * B @ A
    tensors: int  # every tensor of the file (the base's)
    size: int  # bytes

    def as_dict(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "arch": self.arch,
            "merged": self.merged,
            "tensors": self.tensors,
            "bytes": self.size,
        }


# -- reading --------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> dict:
    """{name: float32 numpy array} of a .safetensors file (F32, F16 or BF16), without torch.

    Raises:
        ExportRefused: the file is not safetensors or holds a non-float tensor.
    """
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, struct.error, ValueError) as e:
        raise ExportRefused(f"{path.name}: cannot read it as safetensors: {e}") from None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw, dtype = data[start:end], info["dtype"]
        if dtype == "BF16":  # the top half of a float32
            array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F32", "F16", "F64"):
            array = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).astype(np.float32)
        else:
            raise ExportRefused(f"{path.name}: tensor {name} is {dtype}, not a float tensor")
        tensors[name] = array.reshape(info["shape"])
    return tensors


def base_hparams(base_dir: str | os.PathLike) -> dict:
    """The base model's config.json (architecture, heads, layers).

    Raises:
        ExportRefused: there is no readable config.json there.
    """
    path = Path(base_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportRefused(f"the base model's config.json is not readable at {path}: {e}") from None


def architecture(hparams: dict) -> Architecture:
    """The supported architecture of a base model's config.json.

    Raises:
        ExportRefused: an architecture the writer does not know.
    """
    names = hparams.get("architectures") or [hparams.get("model_type", "?")]
    found = ARCHITECTURES.get(names[0])
    if found is None:
        raise ExportRefused(
            f"base model architecture {names[0]!r} is not supported for GGUF export "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return found


# -- the plan (pure) ------------------------------------------------------------------------------


def _refuse_config(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportRefused(f"peft_type {config.get('peft_type')!r}: only plain LoRA adapters are exported")
    if config.get("use_dora"):
        raise ExportRefused("use_dora: DoRA's magnitude vectors have no llama.cpp adapter form")
    if config.get("modules_to_save"):
        raise ExportRefused(
            f"modules_to_save {config['modules_to_save']}: full module copies are not a LoRA adapter llama.cpp can load"
        )
    if config.get("trainable_token_indices"):
        raise ExportRefused("trainable_token_indices: trained embedding rows are not a LoRA adapter")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ExportRefused("bias: trained biases have no llama.cpp adapter form")
    if config.get("fan_in_fan_out"):
        raise ExportRefused("fan_in_fan_out: Conv1D-style weights are not supported")
    if config.get("layer_replication"):
        raise ExportRefused("layer_replication: the exported layers would not match the base GGUF")
    alphas = set((config.get("alpha_pattern") or {}).values())
    if alphas - {config.get("lora_alpha")}:
        raise ExportRefused("alpha_pattern: llama.cpp applies one adapter.lora.alpha to every tensor")


# peft saves a LoRA on embed_tokens or lm_head as lora_embedding_A/B or lora_A/B, beside the
# whole layer (base_layer.weight) when the layer is an embedding.
_UNTIED_LORA = re.compile(r"^(?:.*\.)?(?P<module>embed_tokens|lm_head)\.(?:base_layer\.|lora_)")


def _not_exported(key: str, module: str) -> ExportRefused:
    what = "an embedding layer" if module == "embed_tokens" else "the output layer"
    return ExportRefused(
        f"adapter tensor {key}: LoRA on {module} ({what}) is not exported: llama.cpp applies "
        "LoRA adapters to linear layers only; leave it out of training.target_modules"
    )


def _refuse_key(key: str) -> ExportRefused:
    if (m := _UNTIED_LORA.match(key)) and "modules_to_save" not in key:
        return _not_exported(key, m.group("module"))
    if "lora_magnitude_vector" in key:
        why = "a DoRA magnitude vector"
    elif "modules_to_save" in key or key.endswith(("embed_tokens.weight", "lm_head.weight")):
        why = "a full embedding or lm_head weight (modules_to_save)"
    else:
        why = "not a lora_A/lora_B weight"
    return ExportRefused(f"adapter tensor {key}: {why}; llama.cpp cannot load it as a LoRA adapter")


def permute_rows(b, n_head: int):
    """llama.cpp's q/k row order: within each head, interleaved halves become contiguous pairs."""
    out = b.shape[0]
    if out % (2 * n_head):
        raise ExportRefused(f"cannot permute {out} rows into {n_head} heads")
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def plan(config: dict, tensors: dict, hparams: dict) -> tuple[str, float, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The GGUF tensors of a peft adapter: (gguf architecture, alpha, [(name, lora_a, lora_b)]).

    Args:
        config: adapter_config.json.
        tensors: adapter_model.safetensors as from :func:`read_safetensors`.
        hparams: the base model's config.json.

    Raises:
        ExportRefused: anything llama.cpp would not apply as peft does (module docstring).
    """
    import gguf

    _refuse_config(config)
    arch = architecture(hparams)
    n_head = int(hparams["num_attention_heads"])
    n_kv = int(hparams.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], int(hparams["num_hidden_layers"]))
    pairs: dict[str, dict] = {}
    for key, array in tensors.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise _refuse_key(key)
        module = m.group("module")
        if module.rsplit(".", 1)[-1] in _NOT_EXPORTABLE_MODULES:
            raise _not_exported(key, module.rsplit(".", 1)[-1])
        pairs.setdefault(module, {})[m.group("ab")] = array
    if not pairs:
        raise ExportRefused("the adapter holds no LoRA tensors")
    lora_alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    out, alphas = [], set()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportRefused(f"{module}: lora_A or lora_B is missing")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportRefused(f"{module}: lora_A {a.shape} and lora_B {b.shape} are not a rank-r pair")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportRefused(f"{module}: no llama.cpp tensor for it in architecture {arch.gguf_arch}")
        if arch.permute_qk and module.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif arch.permute_qk and module.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        rank = a.shape[0]
        scale = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank  # what peft applies
        # llama.cpp scales every tensor by adapter.lora.alpha / its rank: one alpha must fit all.
        alphas.add(round(scale * rank, 6))
        out.append((name, a, b))
    if len(alphas) != 1:
        raise ExportRefused(
            f"per-module scaling differs (effective alphas {sorted(alphas)}); "
            "llama.cpp applies one adapter.lora.alpha to every tensor"
        )
    out.sort(key=lambda t: _natural(t[0]))
    return arch.gguf_arch, alphas.pop(), out


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_gguf(path: str | os.PathLike):
    """gguf's GGUFReader over ``path``.

    Raises:
        ExportRefused: the file cannot be read, or is not a whole GGUF file (a cut one makes the
            reader raise IndexError, struct or numpy errors: whatever the missing bytes trip).
    """
    import gguf

    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise ExportRefused(f"{path} is not a readable GGUF file ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - a malformed file: any error of the parser is that
        raise ExportRefused(
            f"{path} is not a readable GGUF file (cut short or malformed: {type(e).__name__}: {e})"[:300]
        ) from None


def check_base(base_gguf: str | os.PathLike, arch: str, tensors: list, reader=None) -> None:
    """Refuse an adapter that the base GGUF file would not take (architecture, names, shapes).

    Args:
        reader: the base GGUF already read (gguf's reader parses its metadata slowly: the
            vocabulary is read token by token), else it is read here.

    Raises:
        ExportRefused: the file is unreadable, of another architecture, or lacks a tensor of
            the adapted shape.
    """
    if reader is None:
        try:
            reader = _read_gguf(base_gguf)
        except ExportRefused as e:
            raise ExportRefused(f"base GGUF: {e}") from None
    found = reader.fields.get("general.architecture")
    base_arch = found.contents() if found is not None else None
    if base_arch != arch:
        raise ExportRefused(f"base GGUF {base_gguf} is architecture {base_arch!r}, the adapter's base is {arch!r}")
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: [in, out]
    for name, a, b in tensors:
        want, have = [a.shape[1], b.shape[0]], shapes.get(name)
        if have is None or have[:2] != want:
            raise ExportRefused(
                f"base GGUF {base_gguf}: tensor {name} is {have or 'missing'}, "
                f"the adapter needs [in={want[0]}, out={want[1]}] (another base model?)"
            )


# -- writing --------------------------------------------------------------------------------------


def _adapter_plan(adapter_dir: Path, base_dir: str | os.PathLike) -> tuple[str, float, list]:
    """:func:`plan` of the peft adapter in ``adapter_dir`` on the checkpoint in ``base_dir``.

    Raises:
        ExportRefused: as :func:`plan`, or adapter_config.json is not readable.
    """
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportRefused(f"adapter_config.json is not readable in {adapter_dir}: {e}") from None
    return plan(config, read_safetensors(adapter_dir / "adapter_model.safetensors"), base_hparams(base_dir))


def _write_whole(output: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` on a temporary name beside ``output``, fsynced, renamed to ``output``; on
    any failure the temporary file is removed and ``output`` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        durable.fsync(tmp)
        os.replace(tmp, output)
        durable.fsync(output.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_adapter(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base_gguf: str | os.PathLike | None = None,
    name: str = "",
) -> Export:
    """Write ``adapter_dir`` (peft) as a GGUF LoRA adapter at ``output``, whole or not at all.

    Args:
        adapter_dir: holds adapter_config.json and adapter_model.safetensors.
        base_dir: the Hugging Face checkpoint it was trained on (its config.json).
        output: the .gguf file to write (a temporary name beside it, fsynced, then renamed).
        base_gguf: the base GGUF file it will be applied to; when given, its architecture and
            tensor shapes are checked first.
        name: ``general.name`` (e.g. the version).

    Raises:
        ExportRefused: what llama.cpp cannot load as peft applies it; nothing is written.
    """
    import gguf
    import numpy as np

    adapter_dir, output = Path(adapter_dir), Path(output)
    arch, alpha, tensors = _adapter_plan(adapter_dir, base_dir)
    if base_gguf is not None:
        check_base(base_gguf, arch, tensors)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_name(name)
        for tensor_name, a, b in tensors:
            writer.add_tensor(f"{tensor_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{tensor_name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_whole(output, write)
    from lorad.release.registry import sha256_file

    return Export(output, sha256_file(output), arch, alpha, int(tensors[0][1].shape[0]), 2 * len(tensors))


def merge_weight(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """``weight + scale * lora_b @ lora_a`` in float32, a new array.

    ``weight`` is as the GGUF holds it (out x in, q/k rows already in llama.cpp's order) and
    ``lora_b`` is :func:`plan`'s (its rows permuted the same way), so the sum is in that layout.
    """
    import numpy as np

    merged = np.array(weight, dtype=np.float32)
    merged += np.float32(scale) * (np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32))
    return merged


def write_merged(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    base_gguf: str | os.PathLike,
    output: str | os.PathLike,
) -> MergedExport:
    """Write the base GGUF with ``adapter_dir`` merged into it at ``output``, whole or not at all.

    The header and metadata are the base's, byte for byte; so is every tensor the adapter does
    not touch. Each adapted weight W becomes ``W + alpha / rank * lora_b @ lora_a`` (the tensors
    :func:`plan` gives the adapter export, so the same names and q/k row order); a W stored
    quantized (or BF16) is dequantized with gguf's quants module and the sum written as F16, an
    F32 one as F32. Tensors are written one at a time: memory holds one weight, not the model.

    Args:
        adapter_dir: holds adapter_config.json and adapter_model.safetensors.
        base_dir: the Hugging Face checkpoint it was trained on (its config.json).
        base_gguf: the base model's GGUF file, what the merged file copies.
        output: the .gguf file to write (a temporary name beside it, fsynced, then renamed).

    Raises:
        ExportRefused: what :func:`write_adapter` refuses; a base GGUF of the other byte order,
            an adapted weight of a type gguf cannot dequantize, or a merged value beyond F16's
            range. Nothing is written.
        OSError: the file could not be written (a full disk); nothing is left behind.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    arch, alpha, tensors = _adapter_plan(adapter_dir, base_dir)
    try:
        reader = _read_gguf(base_gguf)
    except ExportRefused as e:
        raise ExportRefused(f"base GGUF: {e}") from None
    check_base(base_gguf, arch, tensors, reader)
    if reader.byte_order != "I":
        raise ExportRefused(f"base GGUF {base_gguf} is of the other byte order; it is not merged")
    adapted = {name: (a, b, alpha / a.shape[0]) for name, a, b in tensors}  # llama.cpp's alpha / rank
    _write_whole(output, lambda tmp: _write_merged_file(tmp, reader, adapted))
    from lorad.release.registry import sha256_file

    return MergedExport(output, sha256_file(output), arch, len(adapted), len(reader.tensors), output.stat().st_size)


def _merged_type(base_type):
    """The type an adapted weight is written in: F32 stays F32, anything else (F16, BF16, the
    quantized types) becomes F16."""
    import gguf

    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    return F32 if base_type == F32 else F16


def _merged_tensor(tensor, lora: tuple) -> np.ndarray:
    """One adapted weight of the base, merged, in its :func:`_merged_type`.

    Raises:
        ExportRefused: gguf cannot dequantize its type, its shape is not the adapter's, or a
            merged value does not fit F16.
    """
    import gguf
    import numpy as np

    a, b, scale = lora
    try:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, gguf.quants.QuantError) as e:
        raise ExportRefused(
            f"base tensor {tensor.name} ({tensor.tensor_type.name}) cannot be dequantized: {e}"
        ) from None
    if weight.shape != (b.shape[0], a.shape[1]):
        raise ExportRefused(
            f"base tensor {tensor.name} is {list(weight.shape)}, the adapter's delta {[b.shape[0], a.shape[1]]}"
        )
    merged = merge_weight(weight, a, b, scale)
    if _merged_type(tensor.tensor_type) == gguf.GGMLQuantizationType.F32:
        return merged
    half = merged.astype(np.float16)
    if not np.isfinite(half).all():
        raise ExportRefused(f"merged tensor {tensor.name} has values beyond F16's range; it is not written")
    return half


def _write_merged_file(path: Path, reader, adapted: dict) -> None:
    """The GGUF at ``path``: ``reader``'s header and metadata bytes, its tensor infos with the
    adapted weights' new types and every tensor's offset, then the data, aligned as the base is."""
    import gguf

    if not reader.tensors:
        raise ExportRefused("the base GGUF holds no tensors")
    metadata_end = reader.tensors[0].field.offset  # the header and every key/value pair end here
    align = int(reader.alignment)

    def padded(n: int) -> int:
        return (n + align - 1) // align * align

    infos, offset = bytearray(), 0
    for t in reader.tensors:
        kind, size = t.tensor_type, int(t.n_bytes)
        if t.name in adapted:
            kind = _merged_type(t.tensor_type)
            size = int(t.n_elements) * (4 if kind == gguf.GGMLQuantizationType.F32 else 2)
        name = t.name.encode("utf-8")
        infos += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape))
        infos += b"".join(struct.pack("<Q", int(n)) for n in t.shape)  # ggml order, as the base has it
        infos += struct.pack("<IQ", int(kind), offset)
        offset = padded(offset + size)
    with open(path, "wb") as out:
        out.write(memoryview(reader.data[:metadata_end]))
        out.write(infos)
        out.write(b"\0" * (padded(out.tell()) - out.tell()))
        start = out.tell()
        for t in reader.tensors:
            out.write(b"\0" * (start + padded(out.tell() - start) - out.tell()))
            data = _merged_tensor(t, adapted[t.name]) if t.name in adapted else t.data
            out.write(data.tobytes() if t.name in adapted else memoryview(data).cast("B"))  # type: ignore[arg-type]


def modelfile(base: str, adapter: str = f"./{ADAPTER_FILE}") -> str:
    """An Ollama Modelfile: FROM the base (a GGUF path or an Ollama model), ADAPTER the adapter."""

    def arg(value: str) -> str:
        return f'"{value}"' if any(c.isspace() for c in value) else value

    return f"FROM {arg(base)}\nADAPTER {arg(adapter)}\n"


def publish_base(tables, training_base_model: str) -> str | None:
    """The base the gguf/ollama publish tables name (their ``base``, else a .gguf training base), or None."""
    for t in tables:
        if t.kind in PUBLISH_KINDS:
            return table_base(t, training_base_model)
    return None


def table_base(table, training_base_model: str) -> str:
    """The base one gguf/ollama publish table names: its ``base``, else a .gguf training base, else ""."""
    return table.base or (training_base_model if training_base_model.endswith(".gguf") else "")


def export_into_version(
    adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, base: str, name: str = ""
) -> Export:
    """Write adapter.gguf and a Modelfile into ``adapter_dir`` before it becomes a version.

    Why here: a version is immutable and every file in it has its sha256 in lorad.json, so the
    GGUF is made while the files are still the job's, and promotion only has to find it.

    Raises:
        ExportRefused: as :func:`write_adapter`; neither file is left behind.
        OSError: neither could be written (a full disk); neither is left behind.
    """
    from lorad.training import jobdir

    adapter_dir = Path(adapter_dir)
    base_gguf = base if base.endswith(".gguf") else None
    try:
        done = write_adapter(adapter_dir, base_dir, adapter_dir / ADAPTER_FILE, base_gguf=base_gguf, name=name)
        jobdir.atomic_write(adapter_dir / MODELFILE, modelfile(str(Path(base).resolve()) if base_gguf else base))
    except BaseException:
        for leftover in (ADAPTER_FILE, MODELFILE):
            (adapter_dir / leftover).unlink(missing_ok=True)
        raise
    return done


def wants_merged(tables) -> bool:
    """Does an ollama publish table need the merged model in each version (``ollama_mode`` merged or auto)?"""
    return any(t.kind == "ollama" and t.ollama_mode != "adapter" for t in tables)


def merged_into_version(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, base: str) -> dict:
    """Write merged.gguf into ``adapter_dir`` before it becomes a version; what lorad.json records
    under ``gguf.merged``: the :class:`MergedExport`, or ``{"refused": why}`` (nothing left behind).

    Why here, as for adapter.gguf: the version is immutable and lists every file's sha256.
    """
    output = Path(adapter_dir) / MERGED_FILE
    try:
        if not base.endswith(".gguf"):
            raise ExportRefused(f"the base {base!r} is not a .gguf file, so there is nothing to merge into")
        return write_merged(adapter_dir, base_dir, base, output).as_dict()
    except ExportRefused as e:
        return {"refused": str(e)}
    except OSError as e:
        output.unlink(missing_ok=True)
        return {"refused": f"cannot write {MERGED_FILE} into the version: {e.strerror or e}"}


def drop_merged(adapter_dir: str | os.PathLike) -> None:
    """Remove a job's merged.gguf once its version holds a copy (it is a whole model)."""
    (Path(adapter_dir) / MERGED_FILE).unlink(missing_ok=True)


def version_export(
    tables, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None, training_base_model: str, name: str = ""
) -> dict | None:
    """Export into a job's adapter before it becomes version ``name``, when a gguf/ollama hook wants it.

    Returns:
        None when no publish table needs a GGUF; else what lorad.json records under ``gguf``:
        the :class:`Export` with its base, or ``{"refused": why}`` (the version is made
        without the file and its gguf/ollama hooks fail with that reason). A file that
        cannot be written (a full disk) is such a refusal too: the trained adapter is kept
        as a version either way. When an ollama table's ``ollama_mode`` is merged or auto
        (:func:`wants_merged`), ``merged`` says what :func:`merged_into_version` wrote or why not.
    """
    base = publish_base(tables, training_base_model)
    if base is None:
        return None
    try:
        if not base_dir:
            raise ExportRefused("the worker reported no base model directory")
        done = export_into_version(adapter_dir, base_dir, base, name)
        record = done.as_dict() | {"base": base, "modelfile": MODELFILE}
    except ExportRefused as e:
        return {"refused": str(e)}
    except OSError as e:
        return {"refused": f"cannot write {ADAPTER_FILE} and {MODELFILE} into the version: {e.strerror or e}"}
    if wants_merged(tables):
        record["merged"] = merged_into_version(adapter_dir, base_dir, base)
    return record


def _recorded_refusal(version_dir: Path, part: str | None = None) -> str | None:
    """Why lorad.json says the version's GGUF (or its ``part``, e.g. merged) was not written, if it says."""
    try:
        found = json.loads((version_dir / "lorad.json").read_text(encoding="utf-8")).get("gguf") or {}
    except (OSError, ValueError):
        return None
    if part is not None and "refused" not in found:
        found = found.get(part) or {}
    return found.get("refused") if isinstance(found, dict) else None


def check_version(root: str | os.PathLike, version: str | None) -> tuple[bool, str]:
    """(ok, detail): does version ``version`` under the registry ``root`` hold adapter.gguf and a Modelfile?"""
    if version is None:
        return True, "the base model serves; no adapter to export"
    path = Path(root) / version
    if (path / ADAPTER_FILE).is_file() and (path / MODELFILE).is_file():
        return True, f"{path / ADAPTER_FILE} (FROM/ADAPTER in {path / MODELFILE})"
    why = _recorded_refusal(path) or (
        "it was made before a gguf or ollama publish table was configured; write one by hand "
        f"with: lorad export-adapter {version} --format gguf --output FILE"
    )
    return False, f"{version} has no {ADAPTER_FILE}: {why}"


def merged_problem(root: str | os.PathLike, version: str) -> str | None:
    """Why version ``version`` under the registry ``root`` has no merged.gguf (None when it has one)."""
    path = Path(root) / version
    if (path / MERGED_FILE).is_file():
        return None
    why = _recorded_refusal(path, "merged") or 'it was made while no ollama table had ollama_mode = "merged" or "auto"'
    return f"{version} has no {MERGED_FILE}: {why}"


def export_version(
    registry: Registry, version: str, output: str | os.PathLike, base: str | None
) -> tuple[Export, Path | None]:
    """``lorad export-adapter``: write a registry version's adapter as GGUF at ``output``.

    Args:
        registry: a :class:`lorad.release.registry.Registry`.
        version: a version name or number.
        output: the .gguf file to write.
        base: the base it will be applied to (a .gguf path is checked against), or None; when
            given, a Modelfile is written beside the output as ``<output stem>.Modelfile``.

    Raises:
        ExportRefused: as :func:`write_adapter`, or the version fails its sha256 or has no
            base model directory recorded, or ``output`` (or the Modelfile beside it) is a place
            it must not write (:func:`_refuse_output`), before anything is written.
        lorad.release.registry.RegistryError: no such version.
        OSError: the output could not be written.
    """
    output = Path(output)
    mf = output.with_name(output.stem + ".Modelfile") if base else None
    _refuse_output(output, registry.root, "--output", base)
    if mf is not None:
        _refuse_output(mf, registry.root, "the Modelfile", base)
        if _place(mf) == _place(output):
            raise ExportRefused(
                f"--output {output} is the Modelfile it would write beside the GGUF "
                f"(<name>.Modelfile); name the GGUF file <name>.gguf"
            )
    v = registry.get(version)
    problems = registry.verify(v.name)
    if problems:
        raise ExportRefused(f"refusing {v.name}: " + "; ".join(problems))
    base_dir = v.record.get("base_model_path")
    if not base_dir:
        raise ExportRefused(f"{v.name}: lorad.json records no base_model_path (the checkpoint it was trained on)")
    base_gguf = base if base and base.endswith(".gguf") else None
    done = write_adapter(v.path, base_dir, output, base_gguf=base_gguf, name=f"lorad {v.name}")
    if mf is None or not base:  # no base named: no Modelfile
        return done, None
    from lorad.training.jobdir import atomic_write

    atomic_write(mf, modelfile(str(Path(base).resolve()) if base_gguf else base, f"./{output.name}"))
    return done, mf


def _place(path: Path) -> Path:
    """Where a rename onto ``path`` lands: its folder's real path, and its own name (a symlink
    there is replaced, not followed)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _refuse_output(path: Path, registry_root: Path, what: str, base: str | None) -> None:
    """Refuse a path ``export_version`` must not write: inside the registry (versions are
    immutable, and a file added or replaced there fails verification), the base GGUF, a
    directory, or anything that is not a regular file or a symlink (a device node or FIFO
    would be replaced by the rename: as root, /dev/null).

    Raises:
        ExportRefused: saying which and why.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise ExportRefused(f"{what} {path}: {e.strerror or e}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ExportRefused(f"{what} {path} is a directory; name a file")
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise ExportRefused(f"{what} {path} is not a regular file (a device, FIFO or socket); it is left as it is")
    place, root = _place(path), Path(os.path.realpath(registry_root))
    if place == root or root in place.parents:
        raise ExportRefused(
            f"{what} {path} is inside the adapter registry {registry_root}: versions are "
            "immutable (each file's sha256 is in its lorad.json); write it elsewhere"
        )
    if base and base.endswith(".gguf") and place == _place(Path(base)):
        raise ExportRefused(f"{what} {path} is the base GGUF; write the adapter elsewhere")


def base_problem(base: str) -> str | None:
    """Why a gguf/ollama table's base cannot take lorad's adapters (None when it can, or is an Ollama model).

    Checked by ``lorad serve`` before it starts (exit 78), so a missing or foreign base GGUF is
    not found only when the first version is made.
    """
    if not base.endswith(".gguf"):
        return None
    try:
        field = _read_gguf(base).fields.get("general.architecture")
    except ExportRefused as e:
        return str(e)
    arch = field.contents() if field is not None else None
    supported = sorted({a.gguf_arch for a in ARCHITECTURES.values()})
    if arch not in supported:
        return f"{base} is architecture {arch!r}; GGUF adapters are written for {', '.join(supported)}"
    return None
