"""jax_garden: portable point-to-point RDMA for JAX.

Submodules:
  fabric   TransferEngine on libfabric (one-sided writes with immediates, counters, watchers)
           and the jit ops ``fabric.signal`` / ``fabric.wait``.
  moe      Expert-parallel MoE dispatch/combine as ``jax.jit`` primitives (in one NVLink domain,
           and across processes over the TransferEngine on CPU).
  kv       KV-cache streaming for disaggregated prefill/decode, layer by layer.
  weights  RL weight push from trainer to inference processes (static plan, point to point).
"""

__version__ = "0.1.0"

from jax_garden import _ffi  # noqa: F401  (registers the FFI targets once)
