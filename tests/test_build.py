"""The built extension links the C++ runtime dynamically.

A module that takes libstdc++ from a static archive carries a private, never-initialised copy of
the C++ runtime next to the real ``libstdc++.so.6`` that jaxlib loads: integers vanish from error
messages, or ``std::ostream`` segfaults at the first GPU query (issue 8: the GPU image's
``CXX=/opt/gcc/bin/g++`` has ``libstdc++.a`` but no ``libstdc++.so`` to link against). These tests
read the installed module's ELF dynamic section and dynamic symbols with a small parser (no
binutils needed), so the CPU CI catches this class of link regression too.
"""

from __future__ import annotations

import os
import struct

import pytest

# Symbols only the C++ runtime itself defines (header template instantiations are fine, these are
# not): a module defining any of them carries parts of libstdc++.
RUNTIME_ONLY_SYMBOLS = {
    "_ZNSt6locale7classicEv",        # std::locale::classic()
    "_ZNSt8ios_base4InitC1Ev",       # std::ios_base::Init::Init()
    "_ZNSo9_M_insertIlEERSoT_",      # std::ostream::_M_insert<long> (the crash site in issue 8)
    "_ZNSt12__basic_fileIcED1Ev",    # std::__basic_file<char>::~__basic_file()
}


def elf_dynamic_info(path: str) -> tuple[list[str], set[str]]:
    """(DT_NEEDED entries, names of defined dynamic symbols) of an ELF64 little-endian file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        name, stype, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        sections.append((stype, offset, size, link, entsize))

    def strtab(index: int, at: int) -> str:
        off = sections[index][1] + at
        return data[off:data.index(b"\0", off)].decode()

    needed, defined = [], set()
    SHT_DYNAMIC, SHT_DYNSYM, DT_NEEDED = 6, 11, 1
    for stype, offset, size, link, entsize in sections:
        if stype == SHT_DYNAMIC:
            for pos in range(offset, offset + size, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == 0:
                    break
                if tag == DT_NEEDED:
                    needed.append(strtab(link, val))
        elif stype == SHT_DYNSYM:
            for pos in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
                st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", data, pos)
                if st_shndx != 0:  # SHN_UNDEF: only referenced, not defined here
                    defined.add(strtab(link, st_name))
    return needed, defined


def _module_path() -> str:
    from jax_garden import _jax_garden

    return _jax_garden.__file__


def _libstdcxx_path() -> str | None:
    """The libstdc++.so.6 this process has mapped (jaxlib loads it), if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "libstdc++.so" in os.path.basename(path):
                return path
    return None


def test_module_needs_the_shared_cxx_runtime():
    needed, _ = elf_dynamic_info(_module_path())
    assert "libfabric.so.1" in needed, f"parser sanity: NEEDED = {needed}"
    assert any(n.startswith("libstdc++.so") for n in needed), (
        f"{_module_path()} does not load libstdc++ dynamically (NEEDED = {needed}): the C++ runtime was "
        "linked statically; see cmake/SharedCxxRuntime.cmake")


def test_module_defines_no_symbols_of_the_cxx_runtime():
    _, defined = elf_dynamic_info(_module_path())
    own = sorted(RUNTIME_ONLY_SYMBOLS & defined)
    assert not own, f"{_module_path()} defines C++ runtime symbols of its own: {own}"


def test_parser_finds_runtime_symbols_where_they_are_defined():
    # The same check on libstdc++ itself must report those symbols: the parser reads definitions.
    import jax  # noqa: F401  (jaxlib maps libstdc++.so.6 into the process)

    lib = _libstdcxx_path()
    if lib is None:
        pytest.skip("no libstdc++.so mapped in this process")
    _, defined = elf_dynamic_info(lib)
    assert RUNTIME_ONLY_SYMBOLS <= defined, sorted(RUNTIME_ONLY_SYMBOLS - defined)


def test_error_messages_format_numbers():
    # A private, uninitialised runtime silently drops numbers from std::ostream output: "domains
    # must be in 1.., got" instead of "1..8, got 99" (what the broken build printed). This message
    # is formatted in C++.
    import numpy as np

    from jax_garden import fabric

    with fabric.TransferEngine(provider="tcp") as eng:
        r = eng.register(np.zeros(4096, np.uint8))
        with pytest.raises(ValueError, match=r"source bytes \[0, 8192\) run past the end of the source "
                                             r"region \(4096 bytes\)"):
            eng.write(r, r.descriptor, 8192)
