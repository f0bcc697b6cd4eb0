"""Random valid traces, by construction, for the engine fuzzers and the oracle differential.

Slots live in disjoint zones (slot i in [i * ZONE, (i + 1) * ZONE)), so registering or moving one
never overlaps another; sizes and addresses of ranges are 4 KiB aligned; rows carry no ts (the
caller's table() numbers them in order). Events also reach the gaps between slots and a zone
with no slot. `with_vfio_populate` adds the `vfio` knob and the `populate` kind.
"""

from __future__ import annotations

from hypothesis import strategies as st
from scenario import K, M

PLATFORMS = ("snp", "tdx", "sw")
ZONE = 3 * 2 * M  # slot i lives in [i * ZONE, (i + 1) * ZONE): moves never overlap
SPACE = 4 * ZONE  # events also reach the gaps and the zone of no slot

def knobs_strategy(with_vfio_populate: bool, vfio_modes: tuple[str, ...] = ("none", "pin-all",
                                                                      "on-convert")
                   ) -> st.SearchStrategy[dict]:
    knobs = {
        "dealloc": st.sampled_from(["eager", "lazy", "aligned-2m"]),
        "lazy_limit": st.sampled_from([0, 4 * K, 16 * K, 64 * K, 2 * M]),
        "backing": st.sampled_from(["separate", "inplace"]),
        "exits": st.sampled_from(["coalesce", "per-entry", "batched"]),
        "directmap": st.sampled_from(["split", "unmap", "none"]),
        "gmem_page": st.sampled_from(["4k", "2m"]),
        "shared_page": st.sampled_from(["4k", "2m"]),
        "prefault": st.booleans(),
    }
    if with_vfio_populate:
        knobs["vfio"] = st.sampled_from(vfio_modes)
    return st.fixed_dictionaries(knobs)


pages = st.integers(0, SPACE // (4 * K) - 1)
small_len = st.sampled_from([1, 1, 2, 3, 7, 16, 512, 513, 1024])


@st.composite
def aligned_range(draw, space: int = SPACE) -> tuple[int, int]:
    """(gpa, size), 4 KiB aligned, often 2 MiB aligned."""
    if draw(st.booleans()):
        block = draw(st.integers(0, space // (2 * M) - 1))
        return block * 2 * M, draw(st.sampled_from([1, 1, 2])) * 2 * M
    return draw(pages) * 4 * K, draw(small_len) * 4 * K


@st.composite
def memslot_row(draw, sid: int) -> dict:
    base = sid * ZONE
    if draw(st.integers(0, 5)) == 0:
        return {"kind": "memslot", "vcpu": -1, "slot": sid, "gpa": base, "size": 0,
                "gmem": False}
    off = draw(st.sampled_from([0, 0, 4 * K, 2 * M - 8 * K, 2 * M]))
    size = draw(st.sampled_from([2 * M, 4 * M, 64 * K, 2 * M + 12 * K]))
    size = min(size, ZONE - off)
    return {"kind": "memslot", "vcpu": -1, "slot": sid, "gpa": base + off, "size": size,
            "gmem": draw(st.booleans()) if sid else True}


@st.composite
def psc_request(draw, req: int) -> list[dict]:
    vcpu = draw(st.integers(0, 1))
    if draw(st.integers(0, 5)) == 0:  # MSR protocol: one page
        op = draw(st.sampled_from(["private", "shared", "shared", "psmash"]))
        return [{"kind": "psc", "vcpu": vcpu, "req": -1, "gpa": draw(pages) * 4 * K,
                 "size": 4 * K, "op": op}]
    n = draw(st.integers(1, 6))
    start = draw(pages) * 4 * K
    rows = []
    for _ in range(n):
        op = draw(st.sampled_from(["private", "private", "shared", "shared", "psmash",
                                   "unsmash"]))
        shape = draw(st.integers(0, 4))
        if shape == 0:  # a 2 MiB entry, usually aligned
            gpa = start // (2 * M) * 2 * M if draw(st.integers(0, 7)) else start
            size = 2 * M
        elif shape == 1:  # jump elsewhere
            gpa, size = draw(pages) * 4 * K, 4 * K
        else:  # contiguous 4 KiB-class entry
            gpa, size = start, draw(st.sampled_from([4 * K, 4 * K, 8 * K, 64 * K]))
        rows.append({"kind": "psc", "vcpu": vcpu, "req": req, "gpa": gpa, "size": size,
                     "op": op})
        start = gpa + size
        if start >= SPACE:
            break
    return rows


@st.composite
def trace_rows(draw, with_vfio_populate: bool) -> list[dict]:
    rows = [{"kind": "memslot", "vcpu": -1, "slot": 0, "gpa": 0, "size": 4 * M,
             "gmem": True}]
    if draw(st.booleans()):
        rows.append({"kind": "set_attributes", "vcpu": -1, "gpa": 0, "size": 4 * M,
                     "private": True})
    kinds = ["npf", "npf", "npf", "psc", "psc", "map_gpa", "host_access", "set_attributes",
             "memslot"]
    if with_vfio_populate:
        kinds.append("populate")
    for req in range(1, draw(st.integers(1, 30)) + 1):
        kind = draw(st.sampled_from(kinds))
        if kind == "npf":
            rows.append({"kind": "npf", "vcpu": draw(st.integers(0, 1)),
                         "gpa": draw(pages) * 4 * K + draw(st.sampled_from([0, 8, 4095])),
                         "private": draw(st.booleans()), "write": draw(st.booleans())})
        elif kind == "psc":
            rows.extend(draw(psc_request(req)))
        elif kind == "map_gpa":
            gpa, size = draw(aligned_range())
            size = draw(st.sampled_from([size, size, 5 * M]))
            rows.append({"kind": "map_gpa", "vcpu": 0, "gpa": gpa, "size": size,
                         "private": draw(st.booleans())})
        elif kind == "set_attributes":
            gpa, size = draw(aligned_range())
            rows.append({"kind": "set_attributes", "vcpu": -1, "gpa": gpa, "size": size,
                         "private": draw(st.booleans())})
        elif kind == "host_access":
            gpa = draw(pages) * 4 * K + draw(st.sampled_from([0, 100]))
            rows.append({"kind": "host_access", "vcpu": -1, "gpa": gpa,
                         "size": draw(st.sampled_from([1, 4 * K, 12 * K, 2 * M])),
                         "write": draw(st.booleans()), "agent": "virtio"})
        elif kind == "populate":
            gpa, size = draw(aligned_range())
            rows.append({"kind": "populate", "vcpu": -1, "gpa": gpa, "size": size})
        else:
            rows.append(draw(memslot_row(draw(st.integers(0, 2)))))
    return rows
