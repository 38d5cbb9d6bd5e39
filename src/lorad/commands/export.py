"""`lorad export`: training data as JSONL for trl and AutoTrain."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from lorad.commands import emit

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="write training data as JSONL (chat, alpaca, dpo, kto)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("chat", "alpaca", "dpo", "kto"),
        default="chat",
        help="chat (messages), alpaca (instruction/input/output), dpo (pairs) or kto (unpaired)",
    )
    p.add_argument(
        "--filter",
        metavar="POLICY",
        help='which chains, e.g. "refinement and generator_only" (default: [selection] policy)',
    )
    p.add_argument("--min-retries", type=int, metavar="N", help="high_value: at least N retries")
    p.add_argument(
        "--since",
        metavar="DATE",
        help="only chains created at or after DATE (ISO 8601); sets the cutoff of `recent` "
        "and adds `and recent` to the filter when it has no `recent`",
    )
    p.add_argument(
        "--prompt-template",
        metavar="FILE:KEY",
        help="prompts.json entry: its role opens the system message, or with prompt_format "
        '"atomicguard" its whole template renders the prompt (default: [selection] prompt_template)',
    )
    p.add_argument(
        "--conditioning",
        choices=("both", "first_attempt", "history"),
        help="chat/alpaca prompts: first attempt, with history, or both for a refinement "
        "(default: [selection] conditioning)",
    )
    p.add_argument("--split", choices=("train", "heldout", "all"), default="train")
    p.add_argument("--output", "-o", metavar="FILE", required=True, help="JSONL file to write ('-' = stdout)")
    p.set_defaults(func=run)


def _since(text: str) -> float:
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        from lorad.commands import CommandError

        raise CommandError(f"--since: not an ISO 8601 date: {text!r} (e.g. 2026-11-01)", 2) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def run(args, settings: Settings) -> int:
    from lorad.buffer import examples
    from lorad.buffer.export import export, export_file
    from lorad.buffer.formatting import TemplateError, load_template
    from lorad.buffer.split import contamination
    from lorad.buffer.store import Buffer
    from lorad.buffer.traces import PolicyError
    from lorad.commands import CommandError

    sel = settings.selection
    since = _since(args.since) if args.since else None
    text = args.filter or sel.policy
    if args.min_retries is not None and args.min_retries < 1:
        raise CommandError("--min-retries: must be a positive integer", 2)
    try:
        policy, ctx = examples.policy_and_context(sel, policy=text, min_retries=args.min_retries, since=since)
        if since is not None and "recent" not in policy.atoms:
            policy, ctx = examples.policy_and_context(
                sel, policy=f"({text}) and recent", min_retries=args.min_retries, since=since
            )
        template = load_template(
            args.prompt_template if args.prompt_template is not None else sel.prompt_template,
            sel.prompt_format,
            sel.system_message,
        )
    except PolicyError as e:
        raise CommandError(f"--filter: {e}", 2) from None
    except TemplateError as e:
        raise CommandError(str(e), 2) from None
    if not settings.buffer_path.exists():
        raise CommandError(f"no buffer at {settings.buffer_path}: run `lorad ingest` first", 1)
    to_stdout = args.output == "-"
    with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
        refreshed = examples.refresh(buffer, sel)
        conditioning = args.conditioning or sel.conditioning
        kw = dict(
            fmt=args.fmt,
            policy=policy,
            ctx=ctx,
            conditioning=conditioning,
            split=args.split,
            max_history=sel.max_history,
            max_artifact_chars=sel.max_artifact_chars,
            template=template,
            progress=sys.stderr.isatty() and not args.json,
        )
        report = export(buffer, sys.stdout, **kw) if to_stdout else export_file(buffer, args.output, **kw)
        leaks = contamination(buffer.conn)
    payload = {
        "output": args.output,
        "format": args.fmt,
        "policy": policy.text,
        "conditioning": conditioning,
        "split": args.split,
        **report.as_dict(),
        "buffer": refreshed.totals,
        "contamination": leaks,
    }
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skipped.items()) if n) or "none"
    dups = report.duplicates
    text_out = (
        f"wrote {report.lines} {args.fmt} lines from {report.examples} examples to {args.output}\n"
        f"skipped: {skipped}\n"
        f"duplicates dropped: {sum(dups.values())} (exact {dups.get('exact', 0)}, near {dups.get('near', 0)})\n"
        f"not in split {args.split}: {report.other_split}\n"
        f"contamination: {len(leaks)} held-out examples whose task or answer is also in training"
    )
    for leak in leaks[:20]:
        text_out += f"\n  {leak['chain_id']} ({leak['leak']}): {leak['specification']}"
    if to_stdout:
        print(json.dumps(payload) if args.json else text_out, file=sys.stderr)  # stdout holds the data
    else:
        emit(args, payload, text_out)
    return 0
