"""What every source reader shares: the reader interface, parse errors and field checks.

A reader turns one configured store into :class:`~lorad.buffer.store.Batch` es of normalised
artifact rows (the columns of ``artifacts``) plus quarantine entries. It never writes to the
buffer itself: :func:`lorad.sources.ingest.ingest_source` commits each batch in one transaction, with
the reader's resume state, so a crash between batches loses nothing and repeats nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from lorad.buffer.batch import Batch

if TYPE_CHECKING:
    from pathlib import Path

    from lorad.buffer.store import Buffer

STATUSES = ("pending", "rejected", "accepted", "superseded")
ORIGINS = ("generated", "human", "imported")


class ParseError(Exception):
    "An input could not be turned into an artifact; the message is the human-readable reason."


class Reader(Protocol):
    """A source of attempts and verdicts."""

    key: str

    def watch_paths(self) -> list[Path]:
        """The directories whose changes the daemon watches for this source."""
        ...

    def scan(self, buffer: Buffer, batch_size: int, paths: Iterable[str] | None = None) -> Iterator[Batch]:
        """Yield batches of what changed since the buffer last saw this source.

        The buffer may be read only before the first batch is yielded: ingest commits each
        batch before asking for the next, and what the reader read must not change under it.

        Args:
            buffer: read for what is already known (file signatures, offsets); never written.
            batch_size: rows per batch.
            paths: only look at these files (from watcher events); None scans everything.
        """
        ...


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def safe_name(name: str) -> str:
    """A file name as storable text: undecodable bytes shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


LONE_SURROGATE = "a string holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
# A lone surrogate can only come from an escape: its UTF-8 bytes are refused as not UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def decode_json(data: bytes) -> Any:
    """Parse a JSON document, raising ParseError with a readable reason.

    orjson parses ~3x faster than the standard library; on its error (which reports no
    position we can use) the standard parser runs once more, only to word the reason. A
    string with a lone surrogate escape (``"\\ud800"``) is refused: SQLite cannot store it.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = _decode_slowly(data)
    if _SURROGATE_ESCAPE.search(data):  # rare: paired escapes (emoji) are fine
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ParseError(LONE_SURROGATE) from None
        except RecursionError:
            pass  # nested deeper than the encoder goes: what comes next refuses it
    return obj


def _decode_slowly(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise ParseError("empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise ParseError(f"truncated JSON (ends at line {e.lineno} column {e.colno}: {e.msg})") from None
        raise ParseError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ParseError("malformed JSON: nested too deeply") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits(): the fuzz suite found it
        raise ParseError(f"not valid JSON: {str(e)[:120]}") from None


def finite_number(obj: dict, key: str) -> float | None:
    """``obj[key]`` as a float; None when it is absent or null.

    Raises:
        ParseError: it is not a number, or not a finite one (NaN, Infinity, past a float's range).
    """
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParseError(f"{key}: must be a number, got {kind(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer past 1.8e308
        raise ParseError(f"{key}: must be a finite number, got an integer past a float's range") from None
    if not math.isfinite(number):
        raise ParseError(f"{key}: must be a finite number, got {number!r}")
    return number


SQLITE_MAX_INT = 2**63 - 1  # the largest INTEGER SQLite stores: sqlite3 raises OverflowError past it


def positive_int(obj: dict, key: str, *, required: bool = False) -> int | None:
    """``obj[key]`` as an integer SQLite can store, from 1 to 2**63-1; None when it is absent or null.

    Raises:
        ParseError: it is missing though required, not an integer, below 1, or past 2**63-1 (the
            insert would raise OverflowError, stopping the batch it is in, scan after scan).
    """
    value = obj.get(key)
    if value is None:
        if required:
            raise ParseError(f"{key}: required field is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SQLITE_MAX_INT:
        raise ParseError(f"{key}: must be an integer from 1 to 2**63-1, got {shown(value)}")
    return value


def timestamp(value: Any, key: str = "created_at") -> tuple[str | None, float | None]:
    """(ISO text, epoch seconds) of an ISO 8601 timestamp; naive times are taken as UTC."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise ParseError(f"{key}: must be an ISO 8601 timestamp string, got {_kind(value)}")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise ParseError(f"{key}: not an ISO 8601 timestamp: {value[:64]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return value, dt.timestamp()


def text(obj: dict, key: str, *, required: bool = False, default: str | None = None, where: str = "") -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ParseError(f"{where}{key}: required field is missing")
        return default
    if not isinstance(value, str):
        raise ParseError(f"{where}{key}: must be a string, got {_kind(value)}")
    return value


_EMPTY: dict[type, str] = {list: "[]", dict: "{}"}


def json_text(value: Any, key: str) -> str | None:
    """``value`` as the JSON text stored for the field ``key``; None for null.

    Raises:
        ParseError: JSON text cannot hold it: nested past orjson's 255 levels, an integer past
            64 bits, or NaN or an infinity (which only decode_json's standard-library fallback
            reads: ``NaN``, ``Infinity``, ``1e999``), which orjson would write as null.
    """
    if value is None:
        return None
    if not value and type(value) in _EMPTY:
        return _EMPTY[type(value)]
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as e:  # nesting past orjson's 255 levels: the fuzz suite found it
        raise ParseError(f"cannot be stored as JSON: {e}") from None
    if b"null" in data and _non_finite(value):  # looked for only where a null was written
        raise ParseError(f"{key}: holds NaN or an infinite number (Infinity, 1e999), which JSON has no text for")
    return data.decode()


def _non_finite(value: Any) -> bool:
    """Whether a decoded JSON value holds NaN or an infinity anywhere (without recursing)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def shown(value: Any, limit: int = 64) -> str:
    """``value`` as a refusal's reason shows it: a string cut to ``limit`` characters, a number,
    a boolean as JSON writes it, anything else by its kind ("an array", "null").

    Never recursive, unlike ``repr()``: a value nested 1,000 deep (orjson reads up to 1,024)
    has no repr, and a refusal must not raise RecursionError in its place.
    """
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**20:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # past sys.get_int_max_str_digits() (4,300), where JSON's readers stop too
            return "an integer of too many digits to print"
    if isinstance(value, (int, float)):
        return repr(value)
    return _kind(value)


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


kind = _kind
