"""A deliberately naive model of the replay rules, to check the engine against.

Per 4 KiB guest frame it keeps plain sets and dicts (no bitmaps, no runs) and it shares no code
with upmtrace.model or upmtrace.engine: a rule implemented wrongly there is not
implemented wrongly here by construction. It is slow (every range is walked page by page), so
it is for small traces only. `replay(rows, platform, knobs)` returns the report's counters as a
flat {dotted key: int} dict: every counter of the JSON report except cost.*, timing and recorded.

Rows are dicts with the trace columns (as `Trace.table.to_pylist()` or tests/scenario.py give).
"""

from __future__ import annotations

from collections import Counter

PAGE = 4096
BLOCK = 512  # gfns per 2 MiB block
MSR_REQ = -1
SIZE_2M = BLOCK * PAGE


def blk(gfn: int) -> int:
    return gfn // BLOCK


def block_gfns(block: int) -> range:
    return range(block * BLOCK, (block + 1) * BLOCK)


class Oracle:
    def __init__(self, platform: str, knobs: dict) -> None:
        self.platform = platform
        self.k = knobs
        self.inplace = knobs["backing"] == "inplace"
        self.c: Counter[str] = Counter()
        self.slots: dict[int, tuple[int, int, bool]] = {}  # id -> (first gfn, end gfn, gmem)
        self.private: set[int] = set()  # gfns whose attribute is private
        # resident copies: side True = private (guest_memfd), False = shared; inplace: one set
        shared: set[int] = set()
        self.res = {False: shared, True: shared if self.inplace else set()}
        # folio state per side and block: "intact" or "split" (absent: single pages or nothing)
        shared_folios: dict[int, str] = {}
        self.folio = {False: shared_folios, True: shared_folios if self.inplace else {}}
        self.map4k: dict[int, bool] = {}  # gfn -> privacy of its 4 KiB mapping
        self.map2m: dict[int, bool] = {}  # block -> privacy of its 2 MiB mapping
        self.rmp_private: set[int] = set()  # gfns
        self.rmp_2m: set[int] = set()  # blocks with one 2 MiB private RMP entry
        self.rmp_4k_only: set[int] = set()  # blocks PSMASHed (or populated): 4 KiB entries
        self.dm: dict[int, str] = {}  # block -> "split" / "removed" (absent: intact 2 MiB)
        self.stale: dict[int, int] = {}  # gfn -> age of its stale copy
        self.age = 0
        self.pinned: set[int] = set()
        self.touched: set[int] = set()
        self.peak = Counter()
        self.pinned_peak = 0

    # --- helpers ----------------------------------------------------------------------------

    def slot_of(self, gfn: int):
        for start, end, gmem in self.slots.values():
            if start <= gfn < end:
                return start, end, gmem
        return None

    def attr(self, gfn: int) -> bool:
        return gfn in self.private

    def mapped(self, gfn: int, p: bool) -> bool:
        b = blk(gfn)
        if b in self.map2m:
            return self.map2m[b] == p
        return self.map4k.get(gfn) == p

    def zap(self, gfns) -> None:
        for g in gfns:
            self.map4k.pop(g, None)
            self.map2m.pop(blk(g), None)

    def zap_block(self, b: int) -> None:
        self.map2m.pop(b, None)
        for g in block_gfns(b):
            self.map4k.pop(g, None)

    def alloc(self, side: bool, gfns) -> list[int]:
        new = [g for g in gfns if g not in self.res[side]]
        self.res[side].update(new)
        self.touched.update(new)
        return new

    # --- direct map and RMP -----------------------------------------------------------------

    def dm_update(self, b: int, to_private: bool, huge: bool) -> None:
        if self.platform != "snp":
            return
        mode = self.k["directmap"]
        if mode == "split":
            if not huge and b not in self.dm:
                self.dm[b] = "split"
                self.c["directmap.splits"] += 1
        elif mode == "unmap":
            if to_private:
                if huge:
                    self.dm[b] = "removed"
                elif b not in self.dm:
                    self.dm[b] = "split"
                    self.c["directmap.splits"] += 1
            else:
                if self.dm.get(b) == "removed" and not huge:
                    self.dm[b] = "split"
                if b in self.dm and not any(g in self.rmp_private for g in block_gfns(b)):
                    del self.dm[b]
                    self.c["directmap.restores"] += 1

    def rmp_private_4k(self, gfns) -> None:
        by_block: dict[int, list[int]] = {}
        for g in gfns:
            if g not in self.rmp_private:
                by_block.setdefault(blk(g), []).append(g)
        for b, new in sorted(by_block.items()):
            self.rmp_private.update(new)
            self.c["rmp.updates_4k"] += len(new)
            self.dm_update(b, True, False)

    def rmp_to_shared(self, gfns) -> None:
        by_block: dict[int, list[int]] = {}
        for g in gfns:
            if g in self.rmp_private:
                by_block.setdefault(blk(g), []).append(g)
        for b, gone in sorted(by_block.items()):
            if b in self.rmp_2m:
                self.rmp_2m.discard(b)
                if len(gone) == BLOCK:
                    self.rmp_private.difference_update(gone)
                    self.c["rmp.updates_2m"] += 1
                    self.dm_update(b, False, True)
                    continue
                self.c["rmp.psmash"] += 1
                self.rmp_4k_only.add(b)
            self.rmp_private.difference_update(gone)
            self.c["rmp.updates_4k"] += len(gone)
            self.dm_update(b, False, False)

    # --- freeing ----------------------------------------------------------------------------

    def free(self, side: bool, gfns) -> None:
        res = self.res[side]
        gone = [g for g in gfns if g in res and not (g in self.pinned and self.is_shared_copy(
            side, g))]
        by_block: dict[int, list[int]] = {}
        for g in gone:
            by_block.setdefault(blk(g), []).append(g)
        for b, pages in sorted(by_block.items()):
            res.difference_update(pages)
            left = any(g in res for g in block_gfns(b))
            if not left:
                self.folio[side].pop(b, None)
            elif self.folio[side].get(b) == "intact":
                self.folio[side][b] = "split"
                if side or self.inplace:
                    self.c["gmem.folio_splits"] += 1
            for g in pages:
                self.stale.pop(g, None)
            if self.platform == "snp" and (side or self.inplace):
                self.rmp_to_shared(pages)

    def is_shared_copy(self, side: bool, gfn: int) -> bool:
        """Whether the copy of gfn on `side` is the shared one (what VFIO pins)."""
        return not side or (self.inplace and gfn not in self.private)

    # --- mapping ----------------------------------------------------------------------------

    def page_2m(self, p: bool, gmem: bool) -> bool:
        if p or (self.inplace and gmem):
            return self.k["gmem_page"] == "2m"
        return self.k["shared_page"] == "2m"

    def map(self, gfn: int, p: bool, slot) -> None:
        start, end, gmem = slot
        b = blk(gfn)
        size_2m = self.page_2m(p, gmem)
        inside = start <= b * BLOCK and (b + 1) * BLOCK <= end
        snp, side = self.platform == "snp", p
        if size_2m and inside and b not in self.folio[side]:
            new = self.alloc(side, block_gfns(b))
            self.folio[side][b] = "intact"
            whole = True
        else:
            new = self.alloc(side, [gfn])
            whole = False
        if new and p and snp and not self.inplace:
            if whole and not any(g in self.rmp_private for g in block_gfns(b)):
                self.rmp_private.update(block_gfns(b))
                self.rmp_2m.add(b)
                self.rmp_4k_only.discard(b)
                self.c["rmp.updates_2m"] += 1
                self.dm_update(b, True, True)
            else:
                self.rmp_private_4k(new)
        huge = (size_2m and inside and self.folio[side].get(b) == "intact"
                and all(self.attr(g) == p for g in block_gfns(b))
                and not (p and self.platform == "tdx")
                and not (p and snp and b in self.rmp_4k_only))
        if p and snp and not huge and b in self.rmp_2m:
            self.rmp_2m.discard(b)
            self.rmp_4k_only.add(b)
            self.c["rmp.psmash"] += 1
            self.zap_block(b)
            self.c["exits.vm.npf"] += 2
        if p and snp and self.inplace:
            self.rmp_private_4k(block_gfns(b) if huge else [gfn])
        if huge:
            self.zap_block(b)
            self.map2m[b] = p
            self.c["mappings.2m"] += 1
        else:
            self.map2m.pop(b, None)
            self.map4k[gfn] = p
            self.c["mappings.4k"] += 1

    # --- conversions ------------------------------------------------------------------------

    def set_attributes(self, g0: int, g1: int, p: bool) -> None:
        self.c["conversions.set_attributes_calls"] += 1
        changed = [g for g in range(g0, g1) if self.attr(g) != p]
        if not changed:
            return
        self.c["conversions.to_private_pages" if p else "conversions.to_shared_pages"] += \
            len(changed)
        if p:
            self.private.update(changed)
        else:
            self.private.difference_update(changed)
        for g in changed:
            self.stale.pop(g, None)  # a stale copy on the new side is live again
        self.zap(range(g0, g1))

    def vfio_convert(self, g0: int, g1: int, p: bool) -> None:
        if self.k.get("vfio", "none") != "on-convert":
            return
        in_gmem = [g for g in range(g0, g1) if (s := self.slot_of(g)) is not None and s[2]]
        if not in_gmem:
            return
        if p:
            pinned = [g for g in in_gmem if g in self.pinned]
            if pinned:
                self.c["vfio.dma_unmap_calls"] += 1
                self.pinned.difference_update(pinned)
        elif any(g not in self.pinned for g in in_gmem):
            # a range already mapped and pinned whole needs no call (QEMU's RamDiscardManager
            # notifies its listeners only of a state change), as unmapping needs a pinned page
            self.c["vfio.dma_map_calls"] += 1
            self.alloc(False, [g for g in in_gmem if not (self.inplace and self.attr(g))])
            self.pinned.update(in_gmem)

    def convert(self, g0: int, g1: int, p: bool, explicit: bool) -> None:
        self.set_attributes(g0, g1, p)
        self.vfio_convert(g0, g1, p)
        self.age += 1
        if self.inplace:
            if self.platform == "snp" and not p:
                self.rmp_to_shared(range(g0, g1))
        else:
            self.dealloc(g0, g1, not p)
        if explicit and self.k["prefault"]:
            self.prefault(g0, g1, p)

    def dealloc(self, g0: int, g1: int, old: bool) -> None:
        mode = self.k["dealloc"]
        if mode == "eager":
            self.free(old, range(g0, g1))
        elif mode == "aligned-2m":
            self.free(old, [g for g in range(g0, g1)
                            if blk(g) * BLOCK >= g0 and (blk(g) + 1) * BLOCK <= g1])
        else:
            added = False
            for g in range(g0, g1):
                if g in self.res[old] and g not in self.stale:
                    if g in self.pinned and not old:
                        continue  # a pinned copy cannot be discarded, so it is not stale
                    self.stale[g] = self.age
                    added = True
            limit = self.k["lazy_limit"] // PAGE
            if added and limit:
                while len(self.stale) > limit:
                    _age, g = min((a, g) for g, a in self.stale.items())
                    self.free(not self.attr(g), [g])

    def prefault(self, g0: int, g1: int, p: bool) -> None:
        for g in range(g0, g1):
            slot = self.slot_of(g)
            if slot is None or (p and not slot[2]):
                continue
            if not self.mapped(g, p):
                self.map(g, p, slot)

    # --- events -----------------------------------------------------------------------------

    def memslot(self, row: dict) -> None:
        sid, g0, n = row["slot"], row["gpa"] // PAGE, row["size"] // PAGE
        old = self.slots.pop(sid, None)
        if old is not None:
            start, end, _gmem = old
            pages = range(start, end)
            self.zap(pages)
            mine = [g for g in pages if g in self.pinned]
            if mine:
                self.pinned.difference_update(mine)
            if self.k.get("vfio", "none") != "none" and (mine or self.pins_whole(old)):
                self.c["vfio.dma_unmap_calls"] += 1
            for side in (False, True):
                self.free(side, pages)
        if n:
            slot = (g0, g0 + n, bool(row["gmem"]))
            self.slots[sid] = slot
            if self.pins_whole(slot):
                self.c["vfio.dma_map_calls"] += 1
                self.vfio_fill(slot)

    def pins_whole(self, slot) -> bool:
        mode = self.k.get("vfio", "none")
        return mode == "pin-all" or (mode == "on-convert" and not slot[2])

    def vfio_fill(self, slot) -> None:
        start, end, _gmem = slot
        for b in range(blk(start), blk(end - 1) + 1):
            gfns = [g for g in block_gfns(b) if start <= g < end]
            if (self.k["shared_page"] == "2m" and len(gfns) == BLOCK
                    and b not in self.folio[False]):
                self.alloc(False, gfns)
                self.folio[False][b] = "intact"
            else:
                self.alloc(False, gfns)
        self.pinned.update(range(start, end))

    def npf(self, row: dict) -> None:
        self.c["npf.recorded"] += 1
        gfn = row["gpa"] // PAGE
        p = self.attr(gfn) if self.platform == "sw" else bool(row["private"])
        if self.mapped(gfn, p):
            self.c["npf.avoided"] += 1
            return
        self.c["exits.vm.npf"] += 1
        slot = self.slot_of(gfn)
        if slot is None or (p and not slot[2]):
            if p:
                self.c["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += 1
                self.c["npf.unresolvable"] += 1
            else:
                self.c["npf.mmio"] += 1
            return
        if p != self.attr(gfn):
            self.c["exits.userspace.KVM_EXIT_MEMORY_FAULT"] += 1
            self.c["conversions.implicit"] += 1
            self.convert(gfn, gfn + 1, p, explicit=False)
            self.c["exits.vm.npf"] += 1
        self.map(gfn, p, slot)

    def psc(self, request: list[dict]) -> None:
        c = self.c
        c["exits.vm.vmgexit"] += 1
        c["psc.requests"] += 1
        c["psc.entries"] += len(request)
        if request[0]["req"] == MSR_REQ:
            row = request[0]
            if row["op"] in ("psmash", "unsmash"):
                c["psc.skipped"] += 1
                return
            c["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
            g = row["gpa"] // PAGE
            self.convert(g, g + 1, row["op"] == "private", explicit=True)
            return
        runs: list[list[dict]] = []
        prev = None
        for row in request:
            huge = row["size"] == SIZE_2M
            if huge and row["gpa"] % SIZE_2M:
                c["psc.invalid"] += 1
                break
            if row["op"] in ("psmash", "unsmash"):
                c["psc.skipped"] += 1
                prev = None
                continue
            key = (row["op"], huge, row["gpa"])
            if prev == key:
                runs[-1].append(row)
            else:
                runs.append([row])
            prev = (row["op"], huge, row["gpa"] + row["size"])
        mode = self.k["exits"]
        pieces = [[e] for run in runs for e in run] if mode == "per-entry" else runs
        if mode == "batched":
            c["exits.userspace.KVM_EXIT_HYPERCALL"] += 1 if runs else 0
        else:
            c["exits.userspace.KVM_EXIT_HYPERCALL"] += len(pieces)
        for piece in pieces:
            g0 = piece[0]["gpa"] // PAGE
            g1 = (piece[-1]["gpa"] + piece[-1]["size"]) // PAGE
            self.convert(g0, g1, piece[0]["op"] == "private", explicit=True)

    def map_gpa(self, row: dict) -> None:
        gpa, size, p = row["gpa"], row["size"], bool(row["private"])
        if self.platform == "tdx":
            self.c["exits.vm.tdvmcall"] += 1
            if self.k["exits"] == "batched":
                chunks = [(gpa, size)]
            else:
                chunks = [(s, min(SIZE_2M, gpa + size - s)) for s in range(gpa, gpa + size,
                                                                           SIZE_2M)]
        else:
            self.c["exits.vm.vmgexit" if self.platform == "snp" else "exits.vm.vmcall"] += 1
            chunks = [(gpa, size)]
        for start, length in chunks:
            self.c["exits.userspace.KVM_EXIT_HYPERCALL"] += 1
            self.convert(start // PAGE, (start + length) // PAGE, p, explicit=True)

    def set_attributes_row(self, row: dict) -> None:
        g0, g1, p = row["gpa"] // PAGE, (row["gpa"] + row["size"]) // PAGE, bool(row["private"])
        self.set_attributes(g0, g1, p)
        self.vfio_convert(g0, g1, p)

    def host_access(self, row: dict) -> None:
        g0 = row["gpa"] // PAGE
        g1 = -(-(row["gpa"] + row["size"]) // PAGE)
        self.c["host_access.pages"] += g1 - g0
        for g in range(g0, g1):
            if self.slot_of(g) is None:
                continue
            if self.attr(g):
                if self.inplace:
                    self.c["host_access.faults"] += 1
                    continue
                self.c["host_access.stale"] += 1
            self.alloc(False, [g])

    def populate(self, row: dict) -> None:
        self.c["populate.calls"] += 1
        g0, g1 = row["gpa"] // PAGE, (row["gpa"] + row["size"]) // PAGE
        for g in range(g0, g1):
            slot = self.slot_of(g)
            if slot is None or not slot[2] or not self.attr(g):
                self.c["populate.skipped_pages"] += 1
                continue
            if not self.alloc(True, [g]):
                continue
            self.c["populate.pages"] += 1
            if self.platform == "snp":
                self.rmp_private_4k([g])
                self.rmp_4k_only.add(blk(g))
            elif self.platform == "tdx":
                self.map2m.pop(blk(g), None)
                self.map4k[g] = True
                self.c["mappings.4k"] += 1

    # --- memory -----------------------------------------------------------------------------

    def measure(self) -> None:
        if self.inplace:
            res = self.res[False]
            private = sum(1 for g in res if g in self.private)
            shared, dup = len(res) - private, 0
        else:
            shared, private = len(self.res[False]), len(self.res[True])
            dup = len(self.res[False] & self.res[True])
        for key, value in (("resident", shared + private), ("shared", shared),
                           ("private", private), ("duplicate", dup)):
            self.peak[key] = max(self.peak[key], value)
        self.pinned_peak = max(self.pinned_peak, len(self.pinned))

    def counters(self) -> dict[str, int]:
        c = self.c
        out = {}
        for key in ("KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_HYPERCALL"):
            out[f"exits.userspace.{key}"] = c[f"exits.userspace.{key}"]
        out["exits.userspace_total"] = sum(out.values())
        vm = {f"exits.vm.{k}": c[f"exits.vm.{k}"] for k in ("npf", "vmgexit", "tdvmcall",
                                                            "vmcall")}
        out.update(vm)
        out["exits.vm_total"] = sum(vm.values())
        names = ("npf.recorded npf.avoided npf.mmio npf.unresolvable conversions.implicit "
                 "conversions.set_attributes_calls conversions.to_private_pages "
                 "conversions.to_shared_pages psc.requests psc.entries psc.skipped psc.invalid "
                 "gmem.folio_splits rmp.updates_4k rmp.updates_2m rmp.psmash directmap.splits "
                 "directmap.restores mappings.4k mappings.2m host_access.pages "
                 "host_access.stale host_access.faults populate.calls populate.pages "
                 "populate.skipped_pages vfio.dma_map_calls vfio.dma_unmap_calls").split()
        out.update({name: c[name] for name in names})
        if self.inplace:
            final = len(self.res[False])
        else:
            final = len(self.res[False]) + len(self.res[True])
        touched = len(self.touched)
        out.update({
            "memory.peak_resident_bytes": self.peak["resident"] * PAGE,
            "memory.peak_shared_bytes": self.peak["shared"] * PAGE,
            "memory.peak_private_bytes": self.peak["private"] * PAGE,
            "memory.peak_duplicate_bytes": self.peak["duplicate"] * PAGE,
            "memory.final_resident_bytes": final * PAGE,
            "memory.touched_bytes": touched * PAGE,
            "vfio.pinned_peak_bytes": self.pinned_peak * PAGE,
            "vfio.pinned_final_bytes": len(self.pinned) * PAGE,
        })
        return out


def replay(rows: list[dict], platform: str, knobs: dict) -> dict[str, int]:
    """Replay rows in order; a PSC request is the consecutive psc rows of one (vcpu, req)."""
    o = Oracle(platform, knobs)
    handlers = {"memslot": o.memslot, "set_attributes": o.set_attributes_row, "npf": o.npf,
                "map_gpa": o.map_gpa, "host_access": o.host_access, "populate": o.populate}
    request: list[dict] = []

    def flush() -> None:
        if request:
            o.psc(list(request))
            request.clear()
            o.measure()

    for row in rows:
        if row["kind"] == "psc":
            if request and (row["req"] == MSR_REQ or request[0]["req"] == MSR_REQ
                            or (row["vcpu"], row["req"]) != (request[0]["vcpu"],
                                                             request[0]["req"])):
                flush()
            request.append(row)
            continue
        flush()
        handlers[row["kind"]](row)
        o.measure()
    flush()
    return o.counters()
