"""Who owns what on a shared engine: the imm tags (bits 31..28 of every imm a service sends) and the
mailbox protocol ids. One table, so that no two services on one engine count each other's imms or
read each other's control messages. ``tests/test_service.py`` checks that the tags are distinct and
that the MoE tag agrees with the native module (``ffi/moe/internode_protocol.h``, ``kImmTag``).

Users of the raw engine on an engine shared with these services keep their imms out of these tags
(e.g. below ``0x90000000``)."""

from __future__ import annotations

import dataclasses
import enum


class Service(enum.Enum):
    MOE_INTERNODE = "moe internode"
    WEIGHTS = "weights"
    KV = "kv"
    MAILBOX = "mailbox"


@dataclasses.dataclass(frozen=True)
class ImmTag:
    service: Service
    tag: int            # bits 31..28 of the imm
    layout: str         # what the other 28 bits hold


IMM_TAGS: tuple[ImmTag, ...] = (
    ImmTag(Service.MOE_INTERNODE, 0x9, "kind | generation | source | destination (ffi/moe/internode_protocol.h)"),
    ImmTag(Service.WEIGHTS, 0xA, "epoch (12 bits) | source rank (16 bits); the tag is settable per publisher/"
                                 "subscriber pair, away from the other services' tags"),
    ImmTag(Service.KV, 0xB, "cache tag (4) | slot (12) | generation (8) | kind (4)"),
    ImmTag(Service.MAILBOX, 0xC, "0xCFFFFFFF doorbell (a control message is on its way), 0xCFFFFFFE liveness "
                                 "probe; the rest is reserved"),
)


def imm_tag(service: Service) -> int:
    """The imm tag the table gives ``service``."""
    for t in IMM_TAGS:
        if t.service is service:
            return t.tag
    raise KeyError(service)


def owner_of_tag(tag: int) -> Service | None:
    """The service whose imms carry ``tag`` (None: no service of jax_garden uses it)."""
    for t in IMM_TAGS:
        if t.tag == tag:
            return t.service
    return None


class ProtocolId(enum.IntEnum):
    """Which service a mailbox message is for (its envelope's protocol byte)."""

    USER = 0      # opaque bytes between applications (kv's send_message / recv_message)
    KV = 1
    WEIGHTS = 2
