"""RL weight push from trainer processes to inference processes on the TransferEngine.

A :class:`Plan` is built once from the two sides' parameter pytrees (shapes, dtypes and
shardings: any ``jax.sharding``, or :class:`MeshSharding` for meshes one does not have). From the
index boxes of every source and destination shard it computes which box each source shard sends
to which destination buffers: every source sends its own bytes straight to where they go (no
funnel through one rank), replicated sources split the work between them, and every destination
replica gets its own copy. Pieces are gathered on the sender into a bounded staging ring laid out
in the destination's row-major order, so each write is as contiguous as the destination layout
allows; large contiguous pieces are written straight from the source shard. The plan is
deterministic, serialisable (:meth:`Plan.to_bytes`) and has a fingerprint both sides check when
they connect.

:class:`Publisher` (trainer processes) pushes a version of the parameters: ``push(params,
version)`` returns a :class:`PushHandle`; chunk k+1 is gathered (and optionally quantized to fp8
e4m3 with per-block scales, declared on the inference side with :class:`Fp8`) while chunk k is on
the wire. :class:`Subscriber` (inference processes) owns two registered copies of its parameter
shards (double buffering): pushes land in the copy not in service and the model switches to a new
version only in :meth:`Subscriber.refresh` / :meth:`Subscriber.wait`, once every byte of it has
landed on every subscriber rank. Completion is learned only by counting imms; each imm carries an
epoch the subscriber handed out for that push, so writes of an abandoned push never count toward a
newer one. See docs/weights.md for the design and the failure semantics.

Modules: ``layout`` (shardings, specs, layouts), ``plan`` (pieces, chunks, imm counts), ``fp8`` (the
NumPy reference of the fp8 transform), ``stager`` (gathering pieces into staging slots), ``protocol``
(imm layout and control messages), ``publisher``, ``subscriber``, ``placement`` (ranks and devices),
``router`` (the weights service of an engine).
"""

from jax_garden.weights import stager
from jax_garden.weights.errors import PeerDead, VersionRefused
from jax_garden.weights.fp8 import FP8_MAX, dequantize_fp8, fp8_error_bound, quantize_fp8, stage_item_numpy
from jax_garden.weights.layout import PLAN_FORMAT, Fp8, Layout, MeshSharding, TensorLayout, TensorSpec, fp8_spec
from jax_garden.weights.plan import (BYTES_MODE_MIN, DEFAULT_CHUNK_BYTES, DEFAULT_DIRECT_MIN_BYTES, KIND_COPY, KIND_FP8,
                                     KIND_SCALE, STAGE_ALIGN, Chunk, Piece, Plan)
from jax_garden.weights.protocol import DEFAULT_IMM_TAG, EPOCH_MOD, WELCOME_BYTES, imm_fields, imm_value
from jax_garden.weights.publisher import Publisher, PushHandle
from jax_garden.weights.subscriber import Subscriber

__all__ = [
    "MeshSharding", "TensorSpec", "Fp8", "fp8_spec", "TensorLayout", "Layout", "Plan", "Publisher", "PushHandle",
    "Subscriber", "quantize_fp8", "dequantize_fp8", "fp8_error_bound", "imm_value", "imm_fields", "PeerDead",
    "VersionRefused",
]
