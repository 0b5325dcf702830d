"""KV-cache streaming for disaggregated prefill/decode, on the TransferEngine.

A decode process owns a paged KV cache (per layer K and V ``jax.Array``s at stable, registered
addresses), reserves pages for a request and hands a small **ticket** to a prefill process. The
prefill's jitted program marks each finished layer (:func:`mark_layer`, a ``fabric.signal`` into a
watcher slot, ordered after that layer's KV write); a host service posts that layer's paged writes as
soon as the mark lands, and ``finish(payload)`` sends a small per-request payload last. The decode
side learns completion only by counting imms. Design and protocol: ``docs/kv.md``.

Decode side::

    cache = kv.PagedKVCache(eng, kv.KVLayout(num_layers=32, num_pages=4096, page_tokens=16,
                                             kv_heads=8, head_dim=128), devices=jax.devices()[:2])
    dec = kv.DecodeSide(cache)
    req = dec.reserve(num_tokens=len(prompt))        # pages + ticket (bytes)
    dec.send_ticket(prefill_contact, req, extra=prompt_bytes)   # or hand req.ticket over any channel
    req.wait(timeout=30)                              # READY / FAILED / CANCELLED (TimeoutError if PENDING)
    first_token = req.payload                         # bytes sent by the prefill's finish()
    k, v = step(cache.k, cache.v, ...)                # jitted, donate_argnums for the cache
    cache.commit(k, v)                                # refuses loudly if XLA moved a buffer
    req.release()                                     # pages back to the allocator when the sequence ends

Prefill side::

    src = kv.PagedKVCache(eng, layout)               # same layout, any page count / head sharding
    pf = kv.PrefillSide(src)
    ticket, prompt = pf.recv_ticket(timeout=30)
    stream = pf.open_stream(ticket, src.allocator.alloc(n_pages))   # ValueError on a bad ticket
    # inside the jitted prefill, after writing layer l's K/V into the source pages:
    #     k_l, v_l = kv.mark_layer(pf.marks, l, token, k_l, v_l)   # token = jnp.uint32(stream.token)
    k, v = prefill(src.k, src.v, ..., jnp.uint32(stream.token)); src.commit(k, v)
    stream.finish(payload)                            # posts what is left, then the payload
    stream.wait(timeout=30)                           # every write completed at the sender

States (decode): ``PENDING`` -> ``READY`` | ``FAILED(reason)`` | ``CANCELLED``. Every wait has a
timeout; a dead peer turns into ``FAILED`` (decode) or a failed stream (prefill) within the timeouts.

Modules: ``layout`` (KVLayout), ``plan`` (which writes move a layer), ``allocator``, ``cache``
(PagedKVCache), ``ticket``, ``imm`` (the imm layout), ``protocol`` (control messages), ``state``
(the request and stream state machines as pure transitions), ``decode`` (Request, DecodeSide),
``prefill`` (Stream, PrefillSide), ``marks`` (mark_layer), ``router`` (the kv service of an engine).
"""

from jax_garden._service.mailbox import Contact
from jax_garden.kv import state
from jax_garden.kv.allocator import PageAllocator
from jax_garden.kv.cache import PagedKVCache
from jax_garden.kv.decode import DecodeSide, Request
from jax_garden.kv.errors import BufferMovedError, OutOfPages, StreamError
from jax_garden.kv.imm import (IMM_DOORBELL, IMM_PING, IMM_TAG, KIND_DATA, KIND_PAYLOAD, MAX_CACHE_TAGS, MAX_SLOTS,
                               kv_imm, unpack_imm)
from jax_garden.kv.layout import KVLayout
from jax_garden.kv.marks import LayerMarks, mark_layer
from jax_garden.kv.plan import PlannedWrite, plan_imm_writes, plan_writes
from jax_garden.kv.prefill import PrefillSide, Stream
from jax_garden.kv.state import State, StreamState
from jax_garden.kv.ticket import TICKET_VERSION, Ticket

__all__ = [
    "KVLayout", "PagedKVCache", "PageAllocator", "OutOfPages", "BufferMovedError", "State", "Request",
    "DecodeSide", "PrefillSide", "Stream", "StreamState", "StreamError", "LayerMarks", "mark_layer", "Ticket",
    "Contact", "PlannedWrite", "plan_writes", "plan_imm_writes", "kv_imm", "unpack_imm", "IMM_DOORBELL", "IMM_PING",
]
