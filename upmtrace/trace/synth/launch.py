"""The launch of a confidential guest: what the VMM copies into private memory before the first
vCPU runs (`populate` rows: KVM_SEV_SNP_LAUNCH_UPDATE, KVM_TDX_INIT_MEM_REGION).

Where it lies, in guest physical addresses:
- The firmware. QEMU maps the firmware image (pc.bios) just below 4 GiB whatever the RAM size:
  RAM below 4 GiB ends at 2 GiB (or at the RAM size, when smaller) and the rest of RAM starts
  at 4 GiB, so [4 GiB - 4 MiB, 4 GiB) is never RAM, in a 256 MiB guest as in a 64 GiB one. For
  a confidential guest QEMU backs pc.bios with guest_memfd, so it is a private-capable memslot
  of its own (layout.FIRMWARE_*), marked private at creation like RAM, and the launch fills it.
- SNP: QEMU launch-updates the whole OVMF image (4 MiB, ending at 4 GiB), then the pages OVMF's
  SEV metadata names at 8 MiB (pre-validated zero pages, the secrets and the CPUID page), each
  range set private by QEMU just before its update (sev_snp_launch_update does). A kernel
  measured into the launch (an IGVM image, or a kernel the VMM loads) adds its image at 1 MiB,
  where QEMU's Linux loader puts a bzImage's protected-mode code: KERNEL_BYTES below.
- TDX: QEMU adds TDVF's sections in the order TDVF's metadata lists them: the boot and the
  configuration firmware volumes (BFV, CFV: together the 4 MiB below 4 GiB), then temporary
  memory and the TD HOB at 8 MiB, relying on the slots' private marking at creation. The ranges
  are those of a real QEMU TDX log.

These pages are already accepted (validated) when the guest starts, so the guest's boot-time
acceptance skips them. On SNP nothing is mapped by populating, so the guest's first touch of
each still faults; on TDX the pages are in the Secure EPT and do not fault.
"""

from __future__ import annotations

import numpy as np

from upmtrace.trace.schema import PAGE_SHIFT, Kind
from upmtrace.trace.synth.layout import FIRMWARE_GPA, FIRMWARE_SIZE, MiB
from upmtrace.trace.synth.rows import Phase, Rows, rows

KERNEL_GPA = 1 * MiB
KERNEL_BYTES = 6 * MiB  # a distribution bzImage is 6..14 MiB; a guest kernel nearer 6
OVMF_METADATA = ((0x800000, 0x9000), (0x80B000, 0x2000), (0x80D000, 0x1000),
                 (0x80E000, 0x1000), (0x80F000, 0x1000), (0x810000, 0x10000))
SNP_LAUNCH = ((FIRMWARE_GPA, FIRMWARE_SIZE), (KERNEL_GPA, KERNEL_BYTES), *OVMF_METADATA)
TDX_LAUNCH = ((0xFFC84000, 0x37C000), (0xFFC00000, 0x84000), (0x810000, 0x10000),
              (0x80B000, 0x2000), (0x809000, 0x2000), (0x800000, 0x6000))

VMM_NS = 100_000  # an attribute ioctl from QEMU
POPULATE_NS = 2_000_000  # one launch update: the PSP / TDX module copies and measures


def launch_ranges(platform: str) -> tuple[tuple[int, int], ...]:
    """(gpa, bytes) of each populate row of `platform`'s launch, in the VMM's order."""
    return TDX_LAUNCH if platform == "tdx" else SNP_LAUNCH


def launch_gfns(platform: str) -> np.ndarray:
    """Sorted gfns the launch populates."""
    return np.unique(np.concatenate([np.arange(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT)
                                     for gpa, size in launch_ranges(platform)]))


def launch(platform: str) -> Phase:
    """The launch's rows: on SNP each range set private, then populated; on TDX populated."""
    ranges = launch_ranges(platform)
    gfn = np.array([gpa >> PAGE_SHIFT for gpa, _ in ranges], dtype=np.int64)
    size = np.array([s for _, s in ranges], dtype=np.uint64)
    one = np.ones(len(ranges), dtype=np.int64)
    phase = Phase(np.arange(len(ranges), dtype=np.float64))
    if platform != "tdx":
        phase.add(rows(Kind.SET_ATTRIBUTES, gfn, size=size, private=True, gap=VMM_NS), one)
    return phase.add(populate(gfn, size), one)


def populate(gfn: np.ndarray, size: np.ndarray) -> Rows:
    return rows(Kind.POPULATE, gfn, size=size, gap=POPULATE_NS)
