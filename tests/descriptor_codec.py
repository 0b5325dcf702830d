"""A test-only codec of MemoryDescriptor bytes, written from the wire format in
ffi/fabric/wire/wire_format.cc, so tests can forge descriptors the way an attacker or a buggy peer
would: change a field, recompute the (public, non-secret) checksum, hand the bytes to the engine."""

from __future__ import annotations

import struct
from typing import Any

MAGIC = 0x444D474A  # "JGMD"


def checksum32(data: bytes) -> int:  # FNV-1a, as checksum32() in wire_format.cc
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def get(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0]

    def raw(self, n: int) -> bytes:
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def blob(self) -> bytes:
        return self.raw(self.get("H"))


def decode(data: bytes) -> dict:
    body, stored = data[:-4], struct.unpack_from("<I", data, len(data) - 4)[0]
    assert checksum32(body) == stored, "checksum"
    r = _Reader(body)
    d: dict[str, Any] = {}
    assert r.get("I") == MAGIC
    d["version"] = r.get("H")
    d["provider"] = r.blob()
    d["base"], d["length"] = r.get("Q"), r.get("Q")
    d["virtual_addressing"], d["kind"], d["device"], d["flags"] = r.get("B"), r.get("B"), r.get("i"), r.get("B")
    d["imm_base"], d["stage_chunk_bytes"] = r.get("Q"), r.get("I")
    d["host_id"], d["pid"], d["process_nonce"] = r.blob(), r.get("I"), r.get("Q")
    if d["version"] >= 3:
        d["region_key"], d["region_slot"] = r.get("Q"), r.get("I")
    if d["version"] >= 5:  # v5: the owner engine's imm mailbox (same-host imm delivery)
        d["mailbox"] = r.get("I")
    if d["flags"] & 2:
        if d["flags"] & 4:  # v4: a VMM range (its size; the fd comes from the owner's broker)
            d["ipc_range_bytes"], d["ipc_offset"], d["pci_bus_id"] = r.get("Q"), r.get("Q"), r.blob()
        else:
            d["ipc_handle"], d["ipc_offset"], d["pci_bus_id"] = r.raw(64), r.get("Q"), r.blob()
    d["domains"] = []
    for _ in range(r.get("B")):
        d["domains"].append({"endpoint": r.blob(), "key": r.get("Q"), "imm_key": r.get("Q")})
    assert r.pos == len(body), "trailing bytes"
    return d


def encode(d: dict) -> bytes:
    def blob(b: bytes) -> bytes:
        return struct.pack("<H", len(b)) + b

    out = struct.pack("<IH", MAGIC, d["version"]) + blob(d["provider"])
    out += struct.pack("<QQBBiB", d["base"], d["length"], d["virtual_addressing"], d["kind"], d["device"], d["flags"])
    out += struct.pack("<QI", d["imm_base"], d["stage_chunk_bytes"]) + blob(d["host_id"])
    out += struct.pack("<IQ", d["pid"], d["process_nonce"])
    if d["version"] >= 3:
        out += struct.pack("<QI", d["region_key"], d["region_slot"])
    if d["version"] >= 5:
        out += struct.pack("<I", d["mailbox"])
    if d["flags"] & 2:
        head = struct.pack("<Q", d["ipc_range_bytes"]) if d["flags"] & 4 else d["ipc_handle"]
        out += head + struct.pack("<Q", d["ipc_offset"]) + blob(d["pci_bus_id"])
    out += struct.pack("<B", len(d["domains"]))
    for k in d["domains"]:
        out += blob(k["endpoint"]) + struct.pack("<QQ", k["key"], k["imm_key"])
    return out + struct.pack("<I", checksum32(out))


def forge(descriptor: Any, **changes: Any) -> bytes:
    """bytes(descriptor) with top-level fields replaced; ``key=`` sets every domain's key."""
    d = decode(bytes(descriptor))
    key = changes.pop("key", None)
    d.update(changes)
    if key is not None:
        for k in d["domains"]:
            k["key"] = key
    return encode(d)


def keys(descriptor: Any) -> list[int]:
    return [k["key"] for k in decode(bytes(descriptor))["domains"]]
