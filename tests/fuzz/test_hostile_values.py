"""Hostile values spliced into otherwise valid inputs: numbers past Python's 4300-digit
int-conversion limit, NaN/Infinity literals, lone surrogates, NUL bytes, deep nesting, huge
strings. Random bytes almost never produce these, so they get their own strategies.

Every parser must turn each one into a row or a rejection with a reason, never another
exception (an uncaught one would stop the ingest of everything after it).
"""

from __future__ import annotations

import json
import math
import os

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


def _row_or_reason(fn, data: bytes) -> None:
    try:
        row = fn(data)
    except ParseError as e:
        assert str(e).strip(), "a rejection must say why"
        return
    assert isinstance(row["artifact_id"], str) and row["artifact_id"]
    json.dumps(row)  # what is accepted can be sent back out
    json.dumps(row, ensure_ascii=False).encode("utf-8")  # and stored: SQLite takes Unicode text only
    assert row["score"] is None or math.isfinite(row["score"])  # a NaN score decided "rejected"


@fuzz
@given(st.sampled_from(_paths(ARTIFACT)), hostile_json)
def test_artifact_parser_rejects_hostile_values_with_a_reason(path, raw):
    _row_or_reason(lambda d: parse_artifact(d, source="s", locator="l"), splice(ARTIFACT, path, raw))


@fuzz
@given(st.sampled_from(_paths(RECORD)), hostile_json)
def test_jsonl_record_parser_rejects_hostile_values_with_a_reason(path, raw):
    _row_or_reason(lambda d: parse_record(d, source="s"), splice(RECORD, path, raw))


@fuzz
@given(
    st.sampled_from(["status", "jobs", "job", "feedback", "cancel", "promote"]),
    st.sampled_from(["limit", "job_id", "record", "version", "pad"]),
    hostile_json,
)
def test_protocol_decoder_rejects_hostile_requests_with_a_reason(command, key, raw):
    line = splice({"command": command, key: 0}, [key], raw)
    try:
        request = protocol.decode_request(line)
    except protocol.ProtocolError as e:
        assert str(e).strip()
        return
    assert request["command"] == command


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
    try:
        config.loads(f"[{section}]\n{key} = {raw}\n")
    except config.ConfigError as e:
        assert e.problems and all(p.strip() for p in e.problems)
