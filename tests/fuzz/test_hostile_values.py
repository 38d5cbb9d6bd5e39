"""Hostile values spliced into otherwise valid inputs: numbers past Python's 4300-digit
int-conversion limit, NaN/Infinity literals, lone surrogates, NUL bytes, deep nesting, huge
strings. Random bytes almost never produce these, so they get their own strategies.

Every parser must turn each one into a rejection with a reason, or into the row a correct
parse gives (parse_oracle), never another exception (an uncaught one would stop the ingest of
everything after it). The bugs these tests found keep a test each at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib

import parse_oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad import config
from lorad.daemon import protocol
from lorad.demo import synthetic
from lorad.sources.atomicguard import parse_artifact
from lorad.sources.base import ParseError
from lorad.sources.jsonl import parse_record

EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

hostile_json = st.one_of(
    st.integers(4290, 6000).map(lambda n: "9" * n),  # int() refuses > 4300 digits
    st.integers(4290, 6000).map(lambda n: "-" + "1" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "9" * 30]),
    st.sampled_from(['"\\ud800"', '"\\udfff x"', '"a\\u0000b"', '"\\ufeff"', '"' + "x" * 200_000 + '"']),
    st.integers(50, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(50, 5000).map(lambda n: '{"a":' * n + "1" + "}" * n),
)

ARTIFACT = synthetic.artifact(workflow_id="w", content="def f(): pass", status="accepted", feedback="ok")
RECORD = {"id": "r1", "prompt": "Write f.", "completion": "def f(): pass", "status": "accepted"}


def splice(doc: dict, key_path: list[str], raw: str) -> bytes:
    """``doc`` as JSON text with the value at ``key_path`` replaced by the raw JSON text ``raw``."""
    marker = "\u2603MARKER\u2603"
    obj = json.loads(json.dumps(doc))
    target = obj
    for k in key_path[:-1]:
        target = target.setdefault(k, {}) if isinstance(target.get(k), dict) else target
    target[key_path[-1]] = marker
    return json.dumps(obj).replace(json.dumps(marker), raw).encode("utf-8", "surrogatepass")


def _paths(doc: dict) -> list[list[str]]:
    out = [[k] for k in doc] + [["new_key"]]
    out += [[k, kk] for k, v in doc.items() if isinstance(v, dict) for kk in v]
    return out


UNREADABLE = "unreadable"  # what no JSON reader may turn into a value: refused wherever it is
NOT_JSON = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")  # Python's json reads them; JSON has no such number
DEEP = 240  # deeper nesting than this may be refused wherever it is (stored JSON is nested 255 deep at most)
CHECKED_KEYS = ("status", "attempt_number", "source")  # whose refusal showed repr(value), which recursed


def decoded(raw: str):
    """What a correct JSON reader makes of the hostile text ``raw``: its value, a stand-in for a
    value nested past DEEP (kept as its text), or UNREADABLE."""
    if raw[0] in "[{" and raw.count(raw[0]) > DEEP:
        return (parse_oracle.DeepList if raw[0] == "[" else parse_oracle.DeepDict)(raw)
    try:
        value = json.loads(raw)
    except ValueError:  # an integer past int()'s 4300 digits
        return UNREADABLE
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate is not Unicode text
        return UNREADABLE
    return value


def _parsed_as_a_correct_parse(parse, model, doc: dict, path: list[str], raw: str) -> None:
    """The hostile value is refused with a reason, or the row is what a correct parse of the
    document gives (parse_oracle): never garbage accepted, never another exception."""
    data = splice(doc, path, raw)
    value = decoded(raw)
    if value is UNREADABLE:
        with pytest.raises(ParseError) as refused:
            parse(data)
        assert str(refused.value).strip(), "a rejection must say why"
        return
    obj = json.loads(json.dumps(doc))
    target = obj
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    expected = model(obj)
    deep = isinstance(value, (parse_oracle.DeepList, parse_oracle.DeepDict))
    if deep:
        expected.may_refuse = "nested deeper than a reader need go"
    elif raw in NOT_JSON:
        expected.may_refuse = "not a JSON number"
    row = parse_oracle.assert_parsed_as(parse, data, expected)
    if row is not None:
        json.dumps(row)  # what is accepted can be sent back out
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # and stored: SQLite takes Unicode text only
        assert row["score"] is None or math.isfinite(row["score"])  # a NaN score decided "rejected"


@fuzz
@given(st.sampled_from(_paths(ARTIFACT)), hostile_json)
def test_artifact_parser_rejects_hostile_values_with_a_reason(path, raw):
    _parsed_as_a_correct_parse(
        lambda d: parse_artifact(d, source="s", locator="l"), parse_oracle.artifact, ARTIFACT, path, raw
    )


@fuzz
@given(st.sampled_from(_paths(RECORD)), hostile_json)
def test_jsonl_record_parser_rejects_hostile_values_with_a_reason(path, raw):
    _parsed_as_a_correct_parse(lambda d: parse_record(d, source="s"), parse_oracle.record, RECORD, path, raw)


# What each command of the fuzz test takes (protocol.COMMANDS, written out as the oracle):
# argument -> (the JSON type it must be, whether it is required).
ARGUMENTS = {
    "status": {},
    "jobs": {"limit": (int, False)},
    "job": {"job_id": (str, True)},
    "cancel": {"job_id": (str, True)},
    "feedback": {"record": (dict, True), "update": (bool, False)},
    "promote": {"version": (str, False), "reason": (str, False)},
}


def _arguments_problem(command: str, request: dict) -> str | None:
    """The argument a correct check refuses, or None."""
    for name, (kind, required) in ARGUMENTS[command].items():
        if name not in request:
            if required:
                return name
            continue
        value = request[name]
        if value is None and command == "promote":
            continue  # version and reason may be null
        if type(value) is not kind or (name == "limit" and value < 1):
            return name
    return None


@fuzz
@given(st.sampled_from(list(ARGUMENTS)), st.sampled_from(["limit", "job_id", "record", "version", "pad"]), hostile_json)
def test_protocol_decoder_rejects_hostile_requests_with_a_reason(command, key, raw):
    """A request JSON cannot carry is refused by the decoder; one it can is decoded as it was sent,
    and its arguments are refused naming the argument at fault unless each is what its command takes."""
    line = splice({"command": command, key: 0}, [key], raw)
    value = decoded(raw)
    deep = isinstance(value, (parse_oracle.DeepList, parse_oracle.DeepDict))
    try:
        request = protocol.decode_request(line)
    except protocol.ProtocolError as e:
        assert str(e).strip()
        assert value is UNREADABLE or deep or len(line) > protocol.MAX_REQUEST, f"refused a readable request: {e}"
        return
    assert request["command"] == command and set(request) == {"command", key}
    if value is not UNREADABLE and not deep:
        assert parse_oracle.same_json(request[key], value)
    problem = _arguments_problem(command, request)
    surrogate = problem is None and value is UNREADABLE and key in ARGUMENTS[command]
    if surrogate:  # a lone surrogate: no SQLite query can carry it, so it must not reach one
        problem = key
    try:
        arguments = protocol.parse_arguments(request)
    except protocol.BadArguments as e:
        assert problem is not None, f"refused valid arguments: {e}"
        assert f"{command}: " in str(e) and problem in str(e), str(e)
        return
    assert problem is None, f"accepted a wrong {problem!r}: {str(request.get(problem))[:80]}"
    if key in ARGUMENTS[command]:
        assert getattr(arguments, key) is request[key]


def _toml_value(raw: str):
    """What a TOML reader makes of ``raw`` (UNREADABLE: an integer past int()'s 4300 digits)."""
    try:
        return tomllib.loads(f"x = {raw}")["x"]
    except ValueError:
        return UNREADABLE


@fuzz
@given(
    st.sampled_from(["daemon", "training", "schedule", "selection"]),
    st.sampled_from(["lora_r", "max_steps", "keep", "min_new_examples", "bogus"]),
    st.one_of(
        st.integers(4290, 6000).map(lambda n: "9" * n),
        st.sampled_from(["nan", "inf", "-inf", "1e999"]),
        st.integers(4290, 6000).map(lambda n: "0x" + "f" * n),
    ),
)
def test_config_loader_rejects_hostile_numbers_naming_the_problem(section, key, raw):
    """An unknown key, a float where an integer goes, or text TOML cannot read is refused, naming
    the key (or the TOML); a huge integer is stored exactly or refused naming the key."""
    name = f"{section}.{key}"
    known = key in {f.name for f in dataclasses.fields(getattr(config.loads(""), section))}
    value = _toml_value(raw)
    try:
        settings = config.loads(f"[{section}]\n{key} = {raw}\n")
    except config.ConfigError as e:
        assert e.problems and all(p.strip() for p in e.problems)
        if value is UNREADABLE:
            assert any(p.startswith("not valid TOML") for p in e.problems), e.problems
        else:
            assert any(p.startswith(f"{name}:") for p in e.problems), e.problems
        return
    assert known, f"accepted the unknown key {name}"
    assert value is not UNREADABLE and type(value) is int, f"accepted {name} = {raw[:20]}..."
    assert getattr(getattr(settings, section), key) == value


# Bugs the fuzz tests above found, one test each, fixed. A bug found next gets its test here as a
# strict xfail, and parse_oracle's Expected.known (or crashes_known) discards the examples that
# hit it until it is fixed; then both go.


@pytest.mark.parametrize("attempt", [str(2**63), "9" * 4300], ids=["2**63", "4300 digits"])
@pytest.mark.parametrize("kind", ["atomicguard", "jsonl"])
def test_an_attempt_number_past_sqlite_integers_is_quarantined_not_a_crash(tmp_path, kind, attempt):
    """One such file (or line) must not stop the ingest of everything beside it, scan after scan."""
    from lorad.buffer.store import Buffer
    from lorad.sources.atomicguard import AtomicGuardSource
    from lorad.sources.ingest import ingest
    from lorad.sources.jsonl import JsonlSource

    if kind == "atomicguard":
        store = tmp_path / "store"
        synthetic.write(store, synthetic.artifact(workflow_id="w1", content="x", status="accepted", artifact_id="good"))
        bad = synthetic.object_path(store, "bad0")
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(splice({**ARTIFACT, "artifact_id": "bad0"}, ["attempt_number"], attempt))
        source = AtomicGuardSource("s", store, settle_seconds=0)
    else:
        log = tmp_path / "feedback.jsonl"
        log.write_bytes(
            json.dumps({**RECORD, "id": "good"}).encode()
            + b"\n"
            + splice({**RECORD, "id": "bad0"}, ["attempt_number"], attempt)
            + b"\n"
        )
        source = JsonlSource("s", log)
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        report = ingest(buffer, [source])
        assert (report.new, report.quarantined) == (1, 1)
        assert "attempt_number" in buffer.quarantine()[0]["reason"]


@pytest.mark.parametrize("key", CHECKED_KEYS)
@pytest.mark.parametrize(
    "parse, doc",
    [(lambda d: parse_artifact(d, source="s", locator="l"), ARTIFACT), (lambda d: parse_record(d, source="s"), RECORD)],
    ids=["artifact", "record"],
)
def test_deep_value_in_a_checked_field_is_refused_not_a_recursion_error(parse, doc, key):
    """1020 levels: within what orjson reads (1024), past what repr() can print."""
    with pytest.raises(ParseError, match=key):
        parse(splice(doc, [key], "[" * 1020 + "]" * 1020))


@pytest.mark.parametrize("raw", ["Infinity", "NaN", "1e999"])
def test_a_non_finite_number_in_metadata_is_refused_not_stored_as_null(raw):
    with pytest.raises(ParseError, match="metadata: holds NaN or an infinite number"):
        parse_record(splice({**RECORD, "metadata": {"n": 0}}, ["metadata", "n"], raw), source="s")


@pytest.mark.parametrize("pairs", [["ab"], [{"a": 1, "b": 2}]], ids=["2-character string", "2-key object"])
def test_legacy_dependency_pairs_are_two_element_arrays(pairs):
    doc = {**ARTIFACT, "context": {**ARTIFACT["context"], "dependency_artifacts": pairs}}
    with pytest.raises(ParseError, match="dependency_artifacts"):
        parse_artifact(json.dumps(doc).encode(), source="s", locator="l")


@pytest.mark.parametrize("command, key", [("job", "job_id"), ("cancel", "job_id"), ("promote", "version")])
def test_a_lone_surrogate_in_an_argument_is_refused(command, key):
    """Refused naming the argument; it reached the job query, which failed with "internal error"."""
    with pytest.raises(protocol.BadArguments, match=f"^{command}: {key} holds a lone surrogate"):
        protocol.parse_arguments(protocol.decode_request(splice({"command": command, key: 0}, [key], '"\\ud800"')))
