"""The kv imm layout (32 bits; EFA and verbs carry 4 bytes).

  31..28  0xB           tag of jax_garden.kv traffic (the service table: jax_garden/_service/tags.py)
  27..24  cache tag     index of the DecodeSide on its engine, 0..14 (15 reserved)
  23..12  slot          request slot of that cache, 0..4094 (4095 reserved)
  11..4   generation    low 8 bits of the slot's 32-bit generation
   3..0   kind          0 = KV data write, 1 = payload write (2..15 reserved)

The full generation travels in tickets and control messages; the imm carries its low bits so that
arrivals of two uses of a slot go to different counters. Safety does not rest on those 8 bits: a
slot (and its pages) is reused only once every write posted under the previous generation has been
counted (READY, or a cancel/abort whose posted count was drained), or after a quarantine when that
proof is impossible (a dead peer). Counters are keyed by imm and never deleted by the engine, so
the 8 bits also bound how many exist: 2 kinds x slots in use x 256.

Control messages ring the mailbox's doorbell (``IMM_DOORBELL``) and liveness probes are
``IMM_PING``: both belong to the mailbox's tag, not to kv's.
"""

from __future__ import annotations

from jax_garden._service.mailbox import IMM_DOORBELL, IMM_PING  # noqa: F401  (re-exported by jax_garden.kv)
from jax_garden._service.tags import Service, imm_tag
from jax_garden._validate import check_int

IMM_TAG = imm_tag(Service.KV)
MAX_SLOTS = 4095
MAX_CACHE_TAGS = 15
KIND_DATA = 0
KIND_PAYLOAD = 1


def kv_imm(cache_tag: int, slot: int, generation: int, kind: int) -> int:
    """The 32-bit imm of one (cache, slot, generation, kind); see the layout above."""
    for name, v in (("cache_tag", cache_tag), ("slot", slot), ("generation", generation), ("kind", kind)):
        check_int(name, v, minimum=None, maximum=None)
    generation = int(generation)
    if not 0 <= cache_tag < MAX_CACHE_TAGS:
        raise ValueError(f"cache tag must be in 0..{MAX_CACHE_TAGS - 1}, got {cache_tag}")
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be in 0..{MAX_SLOTS - 1}, got {slot}")
    if kind not in (KIND_DATA, KIND_PAYLOAD):
        raise ValueError(f"kind must be {KIND_DATA} (data) or {KIND_PAYLOAD} (payload), got {kind}")
    return (IMM_TAG << 28) | (cache_tag << 24) | (slot << 12) | ((generation & 0xFF) << 4) | kind


def unpack_imm(imm: int) -> tuple[int, int, int, int]:
    """``(cache_tag, slot, generation_low8, kind)`` of a kv imm (ValueError for other imms)."""
    imm = check_int("imm", imm, minimum=None, maximum=None)
    if not 0 <= imm <= 0xFFFFFFFF or imm >> 28 != IMM_TAG or (imm >> 24) & 0xF == MAX_CACHE_TAGS:
        raise ValueError(f"imm 0x{imm:08x} is not a kv data/payload imm")
    return (imm >> 24) & 0xF, (imm >> 12) & 0xFFF, (imm >> 4) & 0xFF, imm & 0xF
