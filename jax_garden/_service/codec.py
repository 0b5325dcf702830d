"""The byte codec every service speaks: little-endian fields, sealed frames (magic + body + CRC-32),
and typed messages (one frozen dataclass per message, encoded and decoded here and nowhere else).

A message class declares its fields with the wire types below as annotations::

    KV = Protocol("kv", ProtocolId.KV)

    @KV.message(KvKind.REJECT)
    class Reject:
        cache_id: U64
        slot: U32
        reason: Text

``KV.encode(msg)`` gives ``u8 kind | fields in declaration order``; ``KV.decode(data)`` checks the
kind, every field's bounds and that nothing trails (``ValueError`` naming the message and field).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import typing
import zlib
from typing import Annotated, Any, Callable

import numpy as np

# ------------------------------------------------------------------------------------ wire types
# Each is an annotation for a message field: Annotated[python type, wire name].

U8 = Annotated[int, "u8"]
U16 = Annotated[int, "u16"]
U32 = Annotated[int, "u32"]
U64 = Annotated[int, "u64"]
OptU64 = Annotated[typing.Optional[int], "opt_u64"]   # None or a u64 below 2^64 - 1
Bool = Annotated[bool, "bool"]
Blob = Annotated[bytes, "blob"]               # u32 length + bytes
Text = Annotated[str, "text"]                 # a UTF-8 blob
U32Array = Annotated[np.ndarray, "u32s"]      # u32 count + count x u32
Blobs = Annotated[tuple, "blobs"]             # u32 count + count x blob

_NONE_U64 = (1 << 64) - 1


class Writer:
    """Appends little-endian fields; ``bytes()`` joins them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> "Writer":
        self.parts.append(struct.pack("<B", v))
        return self

    def u16(self, v: int) -> "Writer":
        self.parts.append(struct.pack("<H", v))
        return self

    def u32(self, v: int) -> "Writer":
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> "Writer":
        self.parts.append(struct.pack("<Q", v))
        return self

    def blob(self, b: bytes) -> "Writer":
        self.parts.append(struct.pack("<I", len(b)))
        self.parts.append(bytes(b))
        return self

    def text(self, s: str) -> "Writer":
        return self.blob(s.encode())

    def u32s(self, a: Any) -> "Writer":
        a = np.ascontiguousarray(a, dtype="<u4")
        self.parts.append(struct.pack("<I", a.size))
        self.parts.append(a.tobytes())
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Reads the fields a :class:`Writer` wrote; every read checks the remaining length
    (``ValueError`` naming ``what``)."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = memoryview(data), 0, what

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.what}: truncated ({len(self.data)} bytes; needs {self.pos + n} at field ending "
                             f"at byte {self.pos + n})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def text(self) -> str:
        b = self.blob()
        try:
            return b.decode()
        except UnicodeDecodeError:
            raise ValueError(f"{self.what}: a text field is not UTF-8: {b[:32]!r}") from None

    def u32s(self) -> np.ndarray:
        n = self.u32()
        return np.frombuffer(self._take(4 * n), dtype="<u4").astype(np.uint32)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def seal(magic: bytes, body: bytes) -> bytes:
    """``magic | body | CRC-32 of both``."""
    data = magic + body
    return data + struct.pack("<I", zlib.crc32(data))


def unseal(data: Any, magic: bytes, what: str) -> bytes:
    """The body of a sealed frame; ``TypeError`` for non-bytes, ``ValueError`` for a short frame, a
    wrong magic or a checksum mismatch."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(magic) + 4:
        raise ValueError(f"{what}: truncated ({len(data)} bytes)")
    if data[:len(magic)] != magic:
        raise ValueError(f"{what}: wrong magic {data[:len(magic)]!r} (expected {magic!r}): not a {what}")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise ValueError(f"{what}: checksum mismatch ({len(data)} bytes): garbled or truncated")
    return data[len(magic):-4]


# ------------------------------------------------------------------------------- typed messages

_BOUNDS = {"u8": 1 << 8, "u16": 1 << 16, "u32": 1 << 32, "u64": 1 << 64}


def _put(w: Writer, wire: str, name: str, value: Any, what: str) -> None:
    if wire in _BOUNDS:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < _BOUNDS[wire]:
            raise ValueError(f"{what}.{name}: {value!r} is not a {wire}")
        getattr(w, wire)(int(value))
    elif wire == "opt_u64":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or not 0 <= value < _NONE_U64):
            raise ValueError(f"{what}.{name}: {value!r} is not None or a u64 below 2^64-1")
        w.u64(_NONE_U64 if value is None else int(value))
    elif wire == "bool":
        w.u8(1 if value else 0)
    elif wire == "blob":
        w.blob(bytes(value))
    elif wire == "text":
        w.text(str(value))
    elif wire == "u32s":
        w.u32s(value)
    elif wire == "blobs":
        w.u32(len(value))
        for b in value:
            w.blob(bytes(b))
    else:  # pragma: no cover - caught when the class is declared
        raise AssertionError(wire)


def _get(r: Reader, wire: str) -> Any:
    if wire in _BOUNDS:
        return getattr(r, wire)()
    if wire == "opt_u64":
        v = r.u64()
        return None if v == _NONE_U64 else v
    if wire == "bool":
        v = r.u8()
        if v > 1:
            raise ValueError(f"{r.what}: a flag field holds {v}")
        return bool(v)
    if wire == "blob":
        return r.blob()
    if wire == "text":
        return r.text()
    if wire == "u32s":
        return r.u32s()
    if wire == "blobs":
        return tuple(r.blob() for _ in range(r.u32()))
    raise AssertionError(wire)  # pragma: no cover


def _wire_fields(cls: type) -> list[tuple[str, str]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        meta = getattr(hints[f.name], "__metadata__", ())
        if not meta or meta[0] not in (*_BOUNDS, "opt_u64", "bool", "blob", "text", "u32s", "blobs"):
            raise TypeError(f"{cls.__name__}.{f.name}: annotate message fields with a codec wire type (U32, Text, ...)")
        out.append((f.name, meta[0]))
    return out


class Protocol:
    """The typed messages of one service: a kind (an ``IntEnum`` member) per frozen dataclass."""

    def __init__(self, name: str, protocol_id: int):
        self.name = name
        self.protocol_id = int(protocol_id)
        self._by_kind: dict[int, type] = {}
        self._fields: dict[type, list[tuple[str, str]]] = {}

    def message(self, kind: enum.IntEnum) -> Callable[[type], type]:
        """Class decorator: makes the class a frozen dataclass and registers it under ``kind``."""
        def register(cls: type) -> type:
            cls = dataclasses.dataclass(frozen=True)(cls)
            if int(kind) in self._by_kind:
                raise TypeError(f"{self.name}: kind {kind!r} registered twice")
            self._fields[cls] = _wire_fields(cls)
            self._by_kind[int(kind)] = cls
            cls.KIND = kind
            cls.PROTOCOL = self
            return cls
        return register

    @property
    def kinds(self) -> dict[int, type]:
        return dict(self._by_kind)

    def encode(self, msg: Any) -> bytes:
        cls = type(msg)
        fields = self._fields.get(cls)
        if fields is None:
            raise TypeError(f"{cls.__name__} is not a message of protocol {self.name}")
        w = Writer().u8(int(cls.KIND))
        for name, wire in fields:
            _put(w, wire, name, getattr(msg, name), f"{self.name} {cls.__name__}")
        return w.bytes()

    def decode(self, data: bytes) -> Any:
        """The message ``data`` holds (``ValueError``: unknown kind, truncated, trailing bytes)."""
        if not data:
            raise ValueError(f"{self.name} message: empty")
        cls = self._by_kind.get(data[0])
        if cls is None:
            raise ValueError(f"{self.name} message: unknown kind {data[0]}")
        r = Reader(data[1:], f"{self.name} {cls.__name__} message")
        values = {name: _get(r, wire) for name, wire in self._fields[cls]}
        r.end()
        return cls(**values)
