"""Trace metadata: the `upmtrace.*` keys, in every format, and the format version a table needs.

Parquet and Arrow keep them as schema key-value pairs. JSON Lines keeps them in a first line
`{"upmtrace": {"format": "1", "platform": "snp", "source": ..., "recorded": {...}}}`, CSV in
leading `# upmtrace.KEY=VALUE` comment lines. All three read back to the same raw dict (bytes
keys with the `upmtrace.` prefix, as Parquet has them), which `parse` checks. A file without
metadata reads with the defaults (format 1, platform snp).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from upmtrace.errors import TraceError
from upmtrace.trace.schema import (
    FORMAT_1_1,
    FORMAT_VERSION,
    META_FORMAT,
    META_PLATFORM,
    META_RECORDED,
    META_SOURCE,
    READABLE_FORMATS,
    Kind,
    Platform,
)

PREFIX = "upmtrace."
JSONL_KEY = "upmtrace"  # the one key of a JSON Lines metadata line
CSV_COMMENT = "#"
_ORDER = (META_FORMAT, META_PLATFORM, META_SOURCE, META_RECORDED)


def build(table: pa.Table, platform: Platform, source: str | None,
          recorded: dict | None) -> dict[str, str]:
    """The metadata a writer stores for `table` (a SCHEMA table), in a fixed key order."""
    metadata = {META_FORMAT: version_of(table), META_PLATFORM: platform.value}
    if source is not None:
        metadata[META_SOURCE] = source
    if recorded is not None:
        metadata[META_RECORDED] = json.dumps(recorded, sort_keys=True)
    return metadata


def version_of(table: pa.Table) -> str:
    """The format `table` (a SCHEMA table) needs; see `version_for`."""
    latency = len(table) - table.column("latency").null_count
    return version_for(_count_kind(table, Kind.POPULATE), latency)


def version_for(populate_rows: int, latency_values: int) -> str:
    """`1.1` for a trace with a populate row or a latency value, else `1` (so that older
    readers keep reading it)."""
    return FORMAT_1_1 if populate_rows or latency_values else FORMAT_VERSION


def _count_kind(table: pa.Table, kind: Kind) -> int:
    total = 0
    for chunk in table.column("kind").chunks:
        words = chunk.dictionary.to_pylist()
        if kind.value in words:
            code = words.index(kind.value)
            total += int(np.count_nonzero(np.asarray(chunk.indices.fill_null(-1)) == code))
    return total


# --- reading --------------------------------------------------------------------------------


def parse(raw: dict[bytes, bytes], path: str) -> dict:
    """{"platform", "source", "recorded"} from raw metadata; TraceError names a bad key."""
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}
    version = meta.get(META_FORMAT, FORMAT_VERSION)
    if version not in READABLE_FORMATS:
        raise TraceError(f"{META_FORMAT} is {version!r}; this upmtrace reads formats "
                         f"{' and '.join(map(repr, READABLE_FORMATS))}", path=path)
    platform = meta.get(META_PLATFORM, Platform.SNP.value)
    if platform not in set(Platform):
        raise TraceError(f"{META_PLATFORM} is {platform!r} (expected one of "
                         f"{', '.join(Platform)})", path=path)
    return {"platform": Platform(platform), "source": meta.get(META_SOURCE),
            "recorded": _recorded(meta.get(META_RECORDED), path)}


def _recorded(text: str | None, path: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, a 5000-digit number, deep nesting
        value = None
    if not isinstance(value, dict):
        raise TraceError(f"{META_RECORDED} is not a JSON object", path=path)
    if (bad := _not_a_count(value)) is not None:
        raise TraceError(f"{META_RECORDED}: {bad[0]} is {_short(json.dumps(bad[1]))}, "
                         "not a count (an integer >= 0) or an object of counts", path=path)
    return value


def _not_a_count(tree: dict, prefix: str = "") -> tuple[str, object] | None:
    """The first (dotted key, value) of the recorded tree whose leaf is not a count."""
    for key, value in tree.items():
        if isinstance(value, dict):
            if (bad := _not_a_count(value, f"{prefix}{key}.")) is not None:
                return bad
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{prefix}{key}", value
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def is_jsonl_header(record: object) -> bool:
    """Whether a parsed JSON Lines record is the metadata line."""
    return isinstance(record, dict) and len(record) == 1 and JSONL_KEY in record


def from_jsonl(record: dict, path: str, line: int) -> dict[bytes, bytes]:
    """The raw metadata of a `{"upmtrace": {...}}` line (line `line` of the file)."""
    body = record[JSONL_KEY]
    if not isinstance(body, dict):
        raise TraceError(f'the metadata line must be {{"{JSONL_KEY}": {{...}}}}', path=path,
                         row=line, column=JSONL_KEY)
    raw = {}
    for key, value in body.items():
        if value is None:
            continue  # "source": null is no source
        if key == "recorded" and isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, int | float) and not isinstance(value, bool) and key == "format":
            value = str(value)  # "format": 1 written by hand
        if not isinstance(value, str):
            raise TraceError(f"{PREFIX}{key} must be a string", path=path, row=line,
                             column=JSONL_KEY)
        raw[(PREFIX + key).encode("utf-8", "surrogatepass")] = \
            value.encode("utf-8", "surrogatepass")
    return raw


def from_csv_comments(lines: list[str]) -> dict[bytes, bytes]:
    """The raw metadata of leading CSV comment lines; other comments are ignored."""
    raw = {}
    for text in lines:
        body = text[len(CSV_COMMENT):].strip()
        key, sep, value = body.partition("=")
        key = key.strip()
        if not sep or not key.startswith(PREFIX):
            continue
        raw[key.encode()] = _csv_value(value).encode("utf-8", "surrogatepass")
    return raw


def _csv_value(text: str) -> str:
    text = text.strip()
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


# --- writing --------------------------------------------------------------------------------


def jsonl_header(metadata: dict[str, str]) -> bytes:
    """The first line of a JSON Lines trace: every key, `recorded` as an object."""
    body: dict[str, object] = {}
    for key in _ordered(metadata):
        value: object = metadata[key]
        if key == META_RECORDED:
            value = json.loads(metadata[key])
        body[key.removeprefix(PREFIX)] = value
    return (json.dumps({JSONL_KEY: body}, ensure_ascii=False, separators=(",", ":"))
            + "\n").encode()


def csv_comments(metadata: dict[str, str]) -> bytes:
    """Leading `# upmtrace.KEY=VALUE` lines; a value that would not survive a line (a line
    break, surrounding blanks, a leading quote) is written as a JSON string."""
    lines = []
    for key in _ordered(metadata):
        value = metadata[key]
        if value != value.strip() or value.startswith('"') or not value.isprintable():
            value = json.dumps(value, ensure_ascii=False)
        lines.append(f"{CSV_COMMENT} {key}={value}\n")
    return "".join(lines).encode()


def _ordered(metadata: dict[str, str]) -> list[str]:
    return [k for k in _ORDER if k in metadata] + [k for k in metadata if k not in _ORDER]
