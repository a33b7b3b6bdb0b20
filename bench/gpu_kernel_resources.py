"""What each of our Triton kernels costs an H100 / H200 (sm_90) in registers, spills, shared
memory and occupancy, at the block sizes and shapes our launchers use, measured on a CPU: the
compiles of tests/test_triton_compile.py (Triton's whole pipeline down to a cubin), read by the
cuobjdump that ships with Triton.

    PYTHONPATH=src:tests python bench/gpu_kernel_resources.py [--sm80] [--json FILE]

Needs Triton (no GPU, no TRITON_INTERPRET). Occupancy: resident blocks per SM from registers
(65,536 per SM, allocated per warp in units of 256) and shared memory (228 KiB per SM, 1 KiB
reserved per block), at most 32 blocks and 64 warps; a spill (stack or local bytes > 0) goes to
local memory. `loads`: the most global loads a thread has in flight at once (its SASS's
scoreboards, test_triton_compile.loads_in_flight): a memory-bound kernel's latency hiding.
Register counts are what ptxas allocates, not a speed: they say where a kernel
cannot hide memory latency, not what it runs at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REGS_PER_SM, SMEM_PER_SM, MAX_BLOCKS, MAX_WARPS = 65536, 228 * 1024, 32, 64


def occupancy(regs: int, warps: int, shared: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM on sm_90."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + 1024)
    blocks = min(by_regs, by_smem, MAX_BLOCKS, MAX_WARPS // warps)
    return blocks, blocks * warps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sm80", action="store_true", help="also list the sm_80 (A100) compiles")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels are compiled here")
    import pytest

    import test_triton_compile as tc

    tc.CHECK_SPILLS = False  # list them
    here = os.path.dirname(os.path.abspath(__file__))
    rc = pytest.main(["-q", "-m", "slow", "-p", "no:cacheprovider",
                      os.path.join(here, "..", "tests", "test_triton_compile.py")])  # fmt: skip
    rows, seen = [], set()
    for name, arch, warps, const, use in tc.REPORT:
        if arch != 90 and not args.sm80:
            continue
        key = (name, arch, warps, json.dumps(const, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        blocks, resident = occupancy(use["regs"], warps, use["shared"])
        rows.append(dict(kernel=name, sm=arch, warps=warps, constexprs=const, **use,
                         blocks_per_sm=blocks, warps_per_sm=resident))  # fmt: skip
    print(f"\n{'kernel':24} sm warps regs spill(B) smem(KiB) blocks/SM warps/SM loads  constexprs")
    for r in rows:
        const = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"{r['kernel']:24} {r['sm']:2} {r['warps']:5} {r['regs']:4} "
              f"{r['stack'] + r['local']:8} {r['shared'] / 1024:9.1f} {r['blocks_per_sm']:9} "
              f"{r['warps_per_sm']:8} {r['loads_in_flight']:5}  {const}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    sys.exit(rc)


if __name__ == "__main__":
    main()
