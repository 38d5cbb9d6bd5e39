"""`lorad export-adapter VERSION --format gguf --output FILE`: a version as a llama.cpp adapter, by hand.

The same file the ``gguf``/``ollama`` publish kinds put into a version when it is made, for a
version made before they were configured or for use elsewhere; with a base (``--base``, else
the one the publish tables or a .gguf training.base_model name) an Ollama Modelfile is written
beside it as ``<FILE stem>.Modelfile``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorad.commands import CommandError, emit

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser(
        "export-adapter",
        parents=[common],
        help="write an adapter version as a GGUF LoRA adapter for llama.cpp / Ollama",
    )
    p.add_argument("version", metavar="VERSION", help="a version name, or its number (v0007 or 7)")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="the output format (gguf)")
    p.add_argument("--output", required=True, metavar="FILE", help="the .gguf file to write")
    p.add_argument(
        "--base",
        metavar="GGUF_OR_MODEL",
        help="the base it applies to: a .gguf file (its architecture and shapes are checked) or an "
        "Ollama model; default: the gguf/ollama publish tables' base, or a .gguf training.base_model",
    )
    p.set_defaults(func=export_adapter)


def export_adapter(args, settings: Settings) -> int:
    from lorad.release import open_registry
    from lorad.release.gguf import ExportRefused, export_version, publish_base
    from lorad.release.registry import RegistryError

    base = args.base or publish_base(settings.publish, settings.training.base_model)
    if base is None and settings.training.base_model.endswith(".gguf"):
        base = settings.training.base_model
    try:
        done, modelfile = export_version(open_registry(settings), args.version, args.output, base or None)
    except (ExportRefused, RegistryError) as e:
        raise CommandError(str(e)) from None
    except OSError as e:  # an unwritable folder, a full disk: one line, not a traceback
        raise CommandError(f"cannot write {args.output}: {e.strerror or e}") from None
    payload = done.as_dict() | {"path": str(done.path), "modelfile": str(modelfile) if modelfile else None}
    text = f"wrote {done.path} ({done.tensors} tensors, rank {done.rank}, alpha {done.alpha:g}, {done.arch})" + (
        f"\nwrote {modelfile}: ollama create NAME -f {modelfile}"
        if modelfile
        else "\nno Modelfile: no base known (give --base)"
    )
    emit(args, payload, text)
    return 0
