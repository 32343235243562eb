"""Read the two facts Lambda cares about from an ELF binary: CPU and glibc needs.

A wheel's platform tag is only a promise; the binaries themselves say which CPU
they run on (e_machine) and which glibc symbol versions they need (the
.gnu.version_r section). A binary built for another CPU fails with
"invalid ELF header"; one needing a newer glibc than the runtime's fails with
"GLIBC_2.xx not found". Pure Python, so the check runs on any build machine.
"""

import re
import struct
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
MACHINES = {62: "x86_64", 183: "aarch64"}
_SHT_GNU_VERNEED = 0x6FFFFFFE
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_VERNEED = struct.Struct("<HHIII")
_VERNAUX = struct.Struct("<IHHII")
_GLIBC_VERSION = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?$")


def is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == ELF_MAGIC


def machine(data: bytes) -> str:
    """CPU of a 64-bit little-endian ELF image, e.g. "x86_64"; else a description."""
    if data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF"
    (e_machine,) = struct.unpack_from("<H", data, 18)
    return MACHINES.get(e_machine, f"e_machine {e_machine}")


def required_glibc(data: bytes) -> tuple[int, int]:
    """Highest GLIBC_x.y symbol version the image needs; (0, 0) when none."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entsize, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        _SECTION_HEADER.unpack_from(data, shoff + index * entsize)
        for index in range(count)
    ]
    highest = (0, 0)
    for _, kind, _, _, offset, _, link, needed_files, _, _ in sections:
        if kind != _SHT_GNU_VERNEED:
            continue
        strings_offset = sections[link][4]
        for name in _version_names(data, offset, needed_files, strings_offset):
            match = _GLIBC_VERSION.match(name)
            if match:
                highest = max(highest, (int(match[1]), int(match[2])))
    return highest


def _version_names(data: bytes, offset: int, files: int, strings: int):
    for _ in range(files):
        _, aux_count, _, aux_offset, next_offset = _VERNEED.unpack_from(data, offset)
        aux = offset + aux_offset
        for _ in range(aux_count):
            _, _, _, name, next_aux = _VERNAUX.unpack_from(data, aux)
            end = data.index(b"\0", strings + name)
            yield data[strings + name : end].decode("ascii", "replace")
            aux += next_aux
        offset += next_offset
