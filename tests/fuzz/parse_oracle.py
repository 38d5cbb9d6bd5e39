"""What a correct parse of an artifact file or a JSONL record gives: the fuzz tests' oracle.

Written from the formats as documented (``lorad.sources.atomicguard.parse_artifact`` and the
``lorad.sources.jsonl`` module docstring), over the decoded document: either the row a correct
reader stores, or the keys whose values it must refuse. A reader that accepts garbage, or
stores something other than what it was given, disagrees with it and fails the test.

Known bugs (each with a strict xfail test in test_hostile_values.py; none at present) are named
in :attr:`Expected.known`; a fuzz test discards an example that only hits known bugs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lorad.sources.base import ORIGINS, STATUSES

SQLITE_MAX_INT = 2**63 - 1  # what an INTEGER column holds
INT_AS_FLOAT = 2**64  # orjson reads a JSON integer from here on as a float


class Json:
    """A column stored as JSON text: ``value`` is what it must decode to."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Json({self.value!r:.200})"


class _Deep:
    """Stands for a value nested too deeply to decode here; ``raw`` is its JSON text."""

    raw: str


class DeepList(_Deep, list):
    def __init__(self, raw: str):
        super().__init__([object()])  # a list whose one element is no JSON value a check accepts
        self.raw = raw


class DeepDict(_Deep, dict):
    def __init__(self, raw: str):
        super().__init__(a=object())  # an object with no key the formats know
        self.raw = raw


@dataclass
class Expected:
    """``fields``: the row's columns a correct parse stores (when ``bad`` is empty).
    ``bad``: keys whose values must be refused; the reason names one of them.
    ``may_refuse``: why a refusal is acceptable even where ``bad`` is empty.
    ``known``: bad keys a parser is known to accept (a known bug), with the bug."""

    fields: dict = field(default_factory=dict)
    bad: set = field(default_factory=set)
    may_refuse: str | None = None
    known: dict = field(default_factory=dict)

    def only_known_bugs(self) -> bool:
        """Whether every key that must be refused is one a known bug lets through."""
        return bool(self.bad) and self.bad <= self.known.keys()


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


class _Fields:
    """The checks both formats share, collecting what must be refused into ``out``."""

    def __init__(self, out: Expected):
        self.out = out

    def string(self, obj: dict, key: str, where: str = "", *, required: bool = False, default=None):
        value = obj.get(key)
        if value is None:
            if required:
                self.out.bad.add(where + key)
            return default
        if not isinstance(value, str):
            self.out.bad.add(where + key)
            return default
        return value

    def timestamp(self, obj: dict, key: str = "created_at") -> None:
        value, self.out.fields["created_at"], self.out.fields["created_ts"] = obj.get(key), None, None
        if value is None:
            return
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except (TypeError, ValueError, AttributeError):
            self.out.bad.add(key)
            return
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        self.out.fields["created_at"], self.out.fields["created_ts"] = value, when.timestamp()

    def stored_json(self, column: str, value, key: str) -> None:
        """A value stored as JSON text: as given, or refused when JSON cannot hold it."""
        if isinstance(value, _Deep):
            self.out.may_refuse = self.out.may_refuse or "nested past what JSON text is stored for"
        elif _has_non_finite(value):  # orjson would write it as null
            self.out.bad.add(key)
        self.out.fields[column] = None if value is None else Json(value)

    def obj_or_none(self, obj: dict, key: str) -> dict | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, dict):
            self.out.bad.add(key)
            return None
        return value

    def origin(self, obj: dict) -> None:
        origin = obj.get("source")
        if origin is None:
            origin = "generated"
        elif not (isinstance(origin, str) and origin in ORIGINS):
            self.out.bad.add("source")
        self.out.fields["origin"] = origin

    def attempt(self, value, *, required: bool) -> None:
        if value is None:
            if required:
                self.out.bad.add("attempt_number")
            return
        if type(value) is not int or not 1 <= value <= SQLITE_MAX_INT:
            self.out.bad.add("attempt_number")
        self.out.fields["attempt_number"] = value


def artifact(obj) -> Expected:
    """An AtomicGuard artifact object (decoded) -> what ``parse_artifact`` must give."""
    out = Expected()
    if not isinstance(obj, dict):
        out.bad.add("artifact")
        return out
    f, row = _Fields(out), out.fields
    row["artifact_id"] = f.string(obj, "artifact_id", required=True)
    if row["artifact_id"] == "":
        out.bad.add("artifact_id")
    row["content"] = f.string(obj, "content", required=True)
    row["action_pair_id"] = f.string(obj, "action_pair_id", required=True)
    row["status"] = status = obj.get("status")
    if not (isinstance(status, str) and status in STATUSES):
        out.bad.add("status")
    f.attempt(obj.get("attempt_number"), required=True)

    context = obj.get("context")
    if context is None:
        context = {}
    elif not isinstance(context, dict):
        out.bad.add("context")
        context = {}
    # context.workflow_id is the fallback of the top-level one (older library versions)
    row["workflow_id"] = (f.string(obj, "workflow_id") or f.string(context, "workflow_id", "context.")) or ""
    f.timestamp(obj)
    row["parent_action_pair_id"] = f.string(obj, "parent_action_pair_id")
    row["previous_attempt_id"] = f.string(obj, "previous_attempt_id") or None

    loose = f.string(obj, "feedback")
    passed, fatal, feedback, sub = None, False, loose, None
    result = obj.get("guard_result")
    if isinstance(result, bool):  # legacy: a bare verdict, the feedback beside it
        passed = result
    elif isinstance(result, dict):
        passed = result.get("passed")
        if passed is not None and not isinstance(passed, bool):
            out.bad.add("guard_result.passed")
        fatal = result.get("fatal")
        if fatal is None:
            fatal = False
        elif not isinstance(fatal, bool):
            out.bad.add("guard_result.fatal")
        own = f.string(result, "feedback", "guard_result.")
        feedback = own if own is not None else loose
        sub = result.get("sub_results")
        if sub is not None and not isinstance(sub, list):
            out.bad.add("guard_result.sub_results")
    elif result is not None:
        out.bad.add("guard_result")
    row["passed"] = None if not isinstance(passed, bool) else int(passed)
    row["fatal"] = int(fatal is True)
    row["feedback"] = feedback
    f.stored_json("sub_results", sub, "guard_result.sub_results")

    f.origin(obj)
    f.stored_json("metadata", f.obj_or_none(obj, "metadata"), "metadata")
    row["specification"] = f.string(context, "specification", "context.", default="")
    row["constraints"] = f.string(context, "constraints", "context.", default="")
    f.stored_json(
        "feedback_history", _feedback_history(context.get("feedback_history"), out), "context.feedback_history"
    )
    f.stored_json(
        "dependency_artifacts", _dependencies(context.get("dependency_artifacts"), out), "context.dependency_artifacts"
    )
    row["messages"], row["score"] = None, None
    return out


def _feedback_history(value, out: Expected) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list):
        out.bad.add("context.feedback_history")
        return None
    entries = []
    for entry in value:
        if isinstance(entry, dict):
            pair = entry.get("artifact_id"), entry.get("feedback")
        elif type(entry) is list and len(entry) == 2:  # legacy [id, feedback]
            pair = tuple(entry)
        else:
            pair = None
        if pair is None or not all(isinstance(x, str) for x in pair):
            out.bad.add("context.feedback_history")
            return None
        entries.append({"artifact_id": pair[0], "feedback": pair[1]})
    return entries


def _dependencies(value, out: Expected) -> dict | None:
    """An object (stored as given), or legacy [action pair id, artifact id] arrays of two strings."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, list) and all(
        type(e) is list and len(e) == 2 and all(isinstance(x, str) for x in e) for e in value
    ):
        return dict(value)
    out.bad.add("context.dependency_artifacts")
    return None


def record(obj, score_threshold: float = 0.5) -> Expected:
    """A JSONL feedback record (decoded) -> what ``parse_record`` must give (no parents known)."""
    out = Expected()
    if not isinstance(obj, dict):
        out.bad.add("record")
        return out
    f, row = _Fields(out), out.fields
    rid = obj.get("id")
    if type(rid) is int:
        if abs(rid) >= INT_AS_FLOAT:
            out.may_refuse = "an integer id past 64 bits (orjson reads it as a float)"
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        out.bad.add("id")
    row["artifact_id"] = row["locator"] = rid
    row["content"] = f.string(obj, "completion", required=True)
    prompt = f.string(obj, "prompt")
    messages, constraints = obj.get("messages"), ""
    if messages is not None:
        if isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            users = [m["content"] for m in messages if m["role"] == "user"]
            prompt = prompt if prompt is not None else (users[-1] if users else "")
            constraints = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        else:
            out.bad.add("messages")
    if prompt is None and "prompt" not in out.bad:
        out.bad.add("prompt")
    row["specification"], row["constraints"] = prompt, constraints
    f.stored_json("messages", messages if "messages" not in out.bad else None, "messages")

    score = obj.get("score")
    if score is not None:
        if type(score) not in (int, float) or not math.isfinite(float(score) if abs(score) < 1e308 else math.inf):
            out.bad.add("score")
            score = None
        else:
            score = float(score)
    row["score"] = score
    status = obj.get("status")
    if status is None and score is not None:
        status = "accepted" if score >= score_threshold else "rejected"
    elif not (isinstance(status, str) and status in ("accepted", "rejected")):
        out.bad.add("status")
    row["status"], row["passed"], row["fatal"] = status, int(status == "accepted"), 0

    parent = obj.get("parent_id")
    if type(parent) is int:
        parent = str(parent)
    if parent is not None and not isinstance(parent, str):
        out.bad.add("parent_id")
    row["previous_attempt_id"] = parent
    f.origin(obj)
    f.timestamp(obj)
    f.stored_json("metadata", f.obj_or_none(obj, "metadata"), "metadata")
    attempt = obj.get("attempt_number")
    f.attempt(attempt, required=False)
    row["attempt_number"] = attempt if attempt is not None else (None if parent else 1)
    row["workflow_id"] = f.string(obj, "workflow_id") or parent or rid
    row["feedback"] = f.string(obj, "feedback")
    row["action_pair_id"] = f.string(obj, "action_pair_id") or "feedback"
    row["parent_action_pair_id"], row["sub_results"] = None, None
    row["feedback_history"], row["dependency_artifacts"] = None, None
    return out


def same_json(a, b) -> bool:
    """JSON values alike; numbers by value (orjson reads integers past 64 bits as floats)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if type(a) is int and type(b) is int:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        try:
            x, y = float(a), float(b)
        except OverflowError:  # an integer no float holds
            return False
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_row(row: dict, expected: Expected) -> None:
    """``row`` holds every column ``expected`` names, with the value a correct parse gives."""
    for column, want in expected.fields.items():
        got = row[column]
        if isinstance(want, Json):
            assert got is not None, f"{column}: stored nothing for {want!r}"
            if isinstance(want.value, _Deep):
                assert got == want.value.raw, f"{column}: stored {got[:200]!r}"
            else:
                assert same_json(json.loads(got), want.value), f"{column}: stored {got[:200]!r} for {want!r}"
        else:
            assert got == want and type(got) is type(want), f"{column}: stored {got!r:.200} for {want!r:.200}"


def assert_parsed_as(parse, data: bytes, expected: Expected, *, crashes_known: tuple = ()) -> dict | None:
    """``parse(data)`` refuses what ``expected`` says must be refused, with a reason naming a key
    at fault, and stores what a correct parse gives otherwise. An example that only hits a known
    bug (``expected.known``, or an exception of ``crashes_known``) is discarded.

    Returns:
        The row, or None when refused.
    """
    from hypothesis import event, reject

    from lorad.sources.base import ParseError

    try:
        row = parse(data)
    except ParseError as e:
        reason = str(e)
        assert reason.strip(), "a rejection must say why"
        assert expected.bad or expected.may_refuse, f"refused a valid input: {reason}"
        if expected.bad and not expected.may_refuse and not reason.startswith("cannot be stored as JSON"):
            assert any(key in reason for key in expected.bad), f"{reason!r} names none of {sorted(expected.bad)}"
        event("refused")
        return None
    except crashes_known as e:
        event(f"known crash: {type(e).__name__}")
        reject()
    if expected.only_known_bugs():
        event(f"known bug: {sorted(set(expected.known.values()))}")
        reject()  # accepted, as the known bug does: its xfail test tracks it
    assert not expected.bad, f"accepted what must be refused: {sorted(expected.bad)}"
    check_row(row, expected)
    event("accepted")
    return row
