"""Trace formats 1 and 1.1 (docs/format.md): the one declared Arrow schema and its constants."""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

FORMAT_VERSION = "1"  # written when a trace holds nothing of 1.1, so older readers keep reading it
FORMAT_1_1 = "1.1"  # adds the `populate` kind and the `latency` column
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_1_1)  # a 1 file is a valid 1.1 file

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # 4 KiB guest frame
BLOCK_SHIFT = 21
BLOCK_SIZE = 1 << BLOCK_SHIFT  # 2 MiB
PAGES_PER_BLOCK = BLOCK_SIZE // PAGE_SIZE  # 512
GPA_LIMIT = 1 << 52  # x86-64 physical address width ceiling (MAXPHYADDR <= 52)


class Kind(StrEnum):
    MEMSLOT = "memslot"
    SET_ATTRIBUTES = "set_attributes"
    NPF = "npf"
    PSC = "psc"
    MAP_GPA = "map_gpa"
    HOST_ACCESS = "host_access"
    POPULATE = "populate"  # format 1.1


class PscOp(StrEnum):
    PRIVATE = "private"
    SHARED = "shared"
    PSMASH = "psmash"
    UNSMASH = "unsmash"


class Platform(StrEnum):
    SNP = "snp"
    TDX = "tdx"
    SW = "sw"


MSR_REQ = -1  # psc.req of an MSR-protocol request

SCHEMA = pa.schema(
    [
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("kind", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("vcpu", pa.int32()),
        pa.field("gpa", pa.uint64()),
        pa.field("size", pa.uint64()),
        pa.field("private", pa.bool_()),
        pa.field("write", pa.bool_()),
        pa.field("slot", pa.int32()),
        pa.field("gmem", pa.bool_()),
        pa.field("req", pa.int64()),
        pa.field("op", pa.dictionary(pa.int8(), pa.string())),
        pa.field("agent", pa.dictionary(pa.int8(), pa.string())),
        pa.field("latency", pa.int64()),  # format 1.1: recorded exit-to-entry ns, optional
    ]
)

COLUMNS = tuple(SCHEMA.names)

# Columns a row of each kind must carry (non-null); every other column may be null.
REQUIRED: dict[Kind, tuple[str, ...]] = {
    Kind.MEMSLOT: ("slot", "gpa", "size"),
    Kind.SET_ATTRIBUTES: ("gpa", "size", "private"),
    Kind.NPF: ("vcpu", "gpa", "private"),
    Kind.PSC: ("vcpu", "req", "gpa", "size", "op"),
    Kind.MAP_GPA: ("vcpu", "gpa", "size", "private"),
    Kind.HOST_ACCESS: ("gpa", "size"),
    Kind.POPULATE: ("gpa", "size"),
}

# Metadata keys (Parquet/Arrow schema key-value).
META_FORMAT = "upmtrace.format"
META_PLATFORM = "upmtrace.platform"
META_SOURCE = "upmtrace.source"
META_RECORDED = "upmtrace.recorded"
