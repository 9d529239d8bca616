"""Registers, spills and occupancy of the CUDA kernels, from ptxas (no GPU needed).

Compiles cpp/src/cuda/backend.cu with `nvcc -Xptxas -v` for one architecture (sm_90 unless
--arch says otherwise), or reads a saved ptxas log (--log), and prints one Markdown row per
kernel. Occupancy is computed for 256-thread blocks (the only block size the backend launches)
from the H100/H200 (sm_90) limits: 65536 registers per SM allocated per warp in units of 256,
64 resident warps and 32 blocks per SM, 228 KiB of shared memory with 1 KiB reserved per block.

    python bench/cuda_registers.py            # compile and print the table
    python bench/cuda_registers.py --log F    # from a saved `nvcc -Xptxas -v` log
"""

import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
THREADS = 256
REGISTERS_PER_SM = 65536
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

ENTRY = re.compile(r"Compiling entry function '(\w+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SHARED = re.compile(r"(\d+) bytes smem")


def occupancy(registers, shared_bytes, threads=THREADS):
    """Fraction of an SM's warps resident for `threads`-thread blocks."""
    warps = threads // 32
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_shared = SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    blocks = min(by_registers, by_shared, BLOCKS_PER_SM, WARPS_PER_SM // warps)
    return blocks * warps / WARPS_PER_SM


def short_name(mangled):
    """`row_moments<float16, 8>`-style name of a kernel from its mangled name."""
    name = subprocess.run(
        ["c++filt", mangled], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = name.replace("batchnorm::cuda::", "").replace("batchnorm::detail::", "")
    name = name.replace("__half", "float16").replace("__nv_bfloat16", "bfloat16")
    match = re.match(r"(?:void )?(\w+?)(?:_kernel)?(<[^()]*>)?\(", name)
    if not match:
        return name
    return match.group(1) + (match.group(2) or "").replace(" ", "")


def parse(log):
    """[(kernel, registers, spill stores, spill loads, shared bytes)] in log order."""
    rows, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"name": m.group(1), "stores": 0, "loads": 0}
        elif current and (m := SPILLS.search(line)):
            current["stores"], current["loads"] = int(m.group(2)), int(m.group(3))
        elif current and (m := USED.search(line)):
            shared = SHARED.search(line)
            rows.append(
                (
                    short_name(current["name"]),
                    int(m.group(1)),
                    current["stores"],
                    current["loads"],
                    int(shared.group(1)) if shared else 0,
                )
            )
            current = None
    return rows


def compile_log(arch):
    command = [
        "nvcc",
        "-std=c++17",
        "-O3",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        f"-I{ROOT / 'cpp/include'}",
        f"-I{ROOT / 'cpp/src'}",
        "-c",
        str(ROOT / "cpp/src/cuda/backend.cu"),
        "-o",
        "/dev/null",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    return done.stderr + done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--log", type=pathlib.Path, help="a saved `nvcc -Xptxas -v` log")
    args = parser.parse_args()
    log = args.log.read_text() if args.log else compile_log(args.arch)
    print("| kernel | registers | spills (stores/loads, bytes) | occupancy |")
    print("| --- | --- | --- | --- |")
    for name, registers, stores, loads, shared in sorted(parse(log)):
        spills = f"{stores}/{loads}" if stores or loads else "none"
        print(f"| `{name}` | {registers} | {spills} | {occupancy(registers, shared):.1%} |")


if __name__ == "__main__":
    main()
