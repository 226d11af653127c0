#!/usr/bin/env python3
"""List the GPU code a CUDA shared library carries: `sm_XX` (machine code) and `compute_XX` (PTX).

Reads the fatbinary sections embedded by nvcc (no cuobjdump needed, the CUDA
toolkit here ships without it). Usage: cuda_archs.py LIBRARY [--require sm_80 sm_90 ...]
"""
import argparse
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def archs(path):
    blob = open(path, "rb").read()
    found = set()
    start = blob.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", blob, start)
        offset, end = start + header_size, start + header_size + fat_size
        while offset + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
            arch = struct.unpack_from("<I", blob, offset + 28)[0]
            if kind == KIND_ELF:
                found.add(f"sm_{arch}")
            elif kind == KIND_PTX:
                found.add(f"compute_{arch}")
            if entry_header == 0:
                break
            offset += entry_header + payload
        start = blob.find(struct.pack("<I", FATBIN_MAGIC), max(end, start + 4))
    return sorted(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--require", nargs="*", default=[], help="codes that must be present")
    arguments = parser.parse_args()
    present = archs(arguments.library)
    print(" ".join(present) if present else "no GPU code found")
    missing = [code for code in arguments.require if code not in present]
    if missing:
        print(f"missing: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
