"""Property-based fuzzing of everything that reads untrusted input.

No input may crash a reader or slip past quarantine: each either becomes a valid row or is
rejected with a non-empty reason; where parse_oracle can tell, the row is the one a correct
parse gives and the reason names the field at fault. LORAD_FUZZ_EXAMPLES raises the example count for a long
run (`make fuzz`); the default keeps the suite quick.
"""

from __future__ import annotations

import json
import os

import parse_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad import config
from lorad.buffer.store import ARTIFACT_COLUMNS, Buffer
from lorad.demo import synthetic
from lorad.sources.atomicguard import parse_artifact
from lorad.sources.base import ParseError
from lorad.sources.ingest import ingest
from lorad.sources.jsonl import JsonlSource, parse_record

EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)

VALID = synthetic.artifact(
    workflow_id="w",
    content="def f(): pass",
    status="rejected",
    feedback="nope",
    feedback_history=[("a0", "SyntaxError")],
    metadata={"adapter_version": "v1"},
)


def _check_row(row: dict) -> None:
    assert set(ARTIFACT_COLUMNS) <= set(row)
    assert isinstance(row["artifact_id"], str) and row["artifact_id"]
    assert isinstance(row["content"], str)
    assert row["status"] in ("pending", "rejected", "accepted", "superseded")


def _parse_or_reason(fn, data: bytes):
    try:
        row = fn(data)
    except ParseError as e:
        assert str(e).strip(), "a rejection must say why"
        return None
    _check_row(row)
    return row


@fuzz
@given(st.binary(max_size=400))
def test_artifact_parser_never_crashes_on_bytes(data):
    _parse_or_reason(lambda d: parse_artifact(d, source="s", locator="l"), data)


def _mutations():
    keys = sorted(VALID) + sorted(VALID["context"])
    return st.lists(st.tuples(st.sampled_from(keys), json_values | st.just(KeyError)), min_size=1, max_size=4)


@fuzz
@given(_mutations())
def test_artifact_parser_rejects_every_wrong_field_with_a_reason(mutations):
    """A field set to a wrong value is refused with a reason naming it; a field set to a right
    one (or dropped where optional) gives the row a correct parse gives (parse_oracle)."""
    obj = json.loads(json.dumps(VALID))
    for key, value in mutations:
        target = obj if key in obj or key not in VALID["context"] else obj.get("context")
        if not isinstance(target, dict):
            continue
        if value is KeyError:
            target.pop(key, None)
        else:
            target[key] = value
    data = json.dumps(obj).encode()
    row = parse_oracle.assert_parsed_as(
        lambda d: parse_artifact(d, source="s", locator="l"), data, parse_oracle.artifact(obj)
    )
    if row is not None:
        _check_row(row)


def test_the_artifact_oracle_accepts_the_valid_artifact_and_sees_each_kind_of_wrong_field():
    """The oracle the fuzz test trusts: it takes VALID as it is and refuses what it must."""
    good = parse_oracle.artifact(json.loads(json.dumps(VALID)))
    assert not good.bad and good.fields["content"] == "def f(): pass" and good.fields["status"] == "rejected"
    parse_oracle.check_row(parse_artifact(json.dumps(VALID).encode(), source="s", locator="l"), good)
    for key, value, bad in [
        ("status", "maybe", "status"),
        ("attempt_number", 0, "attempt_number"),
        ("attempt_number", True, "attempt_number"),
        ("content", None, "content"),
        ("guard_result", [], "guard_result"),
        ("metadata", [1], "metadata"),
        ("created_at", "yesterday", "created_at"),
        ("artifact_id", "", "artifact_id"),
    ]:
        assert parse_oracle.artifact({**VALID, key: value}).bad == {bad}, key
    history = {**VALID, "context": {**VALID["context"], "feedback_history": [["a0"]]}}
    assert parse_oracle.artifact(history).bad == {"context.feedback_history"}


@fuzz
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_jsonl_record_parser_never_crashes(data):
    _parse_or_reason(lambda d: parse_record(d, source="s"), data)


@settings(max_examples=max(20, EXAMPLES // 4), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.binary(max_size=80)
        | st.builds(
            lambda i, s: json.dumps({"id": f"r{i}", "prompt": "p", "completion": "c", "status": s}).encode(),
            st.integers(0, 50),
            st.sampled_from(["accepted", "rejected", "maybe"]),
        ),
        max_size=12,
    )
)
def test_jsonl_reader_accounts_for_every_line(tmp_path_factory, lines):
    """Every complete non-blank line ends up as a row or in quarantine; the offset covers them."""
    folder = tmp_path_factory.mktemp("log")
    log = folder / "feedback.jsonl"
    body = b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines)
    log.write_bytes(body)
    with Buffer(folder / "b.sqlite3") as buffer:
        report = ingest(buffer, [JsonlSource("log", log)])
        assert not report.errors
        stored = buffer.counts()["artifacts"]
        held = buffer.counts()["quarantined"]
        nonblank = [line for line in body.split(b"\n")[:-1] if line.strip()]
        assert report.new + report.updated + report.unchanged + report.quarantined == len(nonblank)
        assert stored <= len(nonblank) and held == report.quarantined
        assert buffer.source_state("log")["offset"] == len(body)


toml_scalars = st.one_of(
    st.integers(-10, 10_000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(0, 5), max_size=3),
    st.lists(st.text(max_size=6), max_size=3),
)
SECTIONS = ["daemon", "store", "buffer", "selection", "schedule", "training", "evaluation", "registry", "logging"]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


@fuzz
@given(
    st.dictionaries(
        st.sampled_from(SECTIONS),
        st.dictionaries(
            st.sampled_from(
                [
                    "state_dir",
                    "lora_r",
                    "windows",
                    "policy",
                    "level",
                    "keep",
                    "batch_size",
                    "bogus",
                    "timezone",
                    "heldout_fraction",
                    "learning_rate",
                    "allowed_uids",
                    "min_retries",
                ]
            ),
            toml_scalars,
            max_size=4,
        ),
        max_size=4,
    )
)
def test_config_loader_accepts_or_names_the_key(doc):
    text = "\n".join(
        f"[{section}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in keys.items()) for section, keys in doc.items()
    )
    try:
        config.loads(text)
    except config.ConfigError as e:
        assert e.problems
        for problem in e.problems:
            head = problem.split(":")[0]
            assert (
                head.split(".")[0].split("[")[0] in SECTIONS or head == "<root>" or problem.startswith("not valid TOML")
            ), problem


@fuzz
@given(st.text(max_size=200))
def test_config_loader_never_crashes_on_text(text):
    try:
        config.loads(text)
    except config.ConfigError as e:
        assert str(e)
