"""Every setting jax_garden reads from the environment, in one place. Each is read when it is
used (never at import), so a process may change it between calls; docs/semantics.md lists them.

======================================  ========  ===========================================
variable                                default   meaning
======================================  ========  ===========================================
``JAX_GARDEN_TCP_NODE``                 127.0.0.1 address the ``tcp`` provider binds when
                                                  ``TransferEngine(node=None)``
``JAX_GARDEN_MOE_TIMEOUT_S``            30        default bound of every MoE kernel wait (s)
``JAX_GARDEN_MOE_CHUNK_BYTES``          (auto)    CUDA MoE: bytes per copy chunk (tuning)
``JAX_GARDEN_MOE_BLOCKS_PER_SM``        (auto)    CUDA MoE: thread blocks per SM (tuning)
``JAX_GARDEN_MOE_CUDA_GRAPHS``          1         0: MoE CUDA calls traced from now on use the
                                                  targets without the command-buffer trait
``JAX_GARDEN_MOE_SYNC``                 arrive    CUDA MoE contexts created from now on
                                                  synchronise their NVLink kernels by ``arrive``
                                                  (release reductions into the peers' counters),
                                                  ``flags`` (last block publishes a flag) or
                                                  ``legacy`` (the first version): bench moe
                                                  --profile compares them
``JAX_GARDEN_MOE_LEGACY_SYNC``          0         1: same as ``JAX_GARDEN_MOE_SYNC=legacy``
``JAX_GARDEN_MOE_FUSED``                1         0: CUDA MoE contexts created from now on run
                                                  ``dispatch()``/``combine()`` as two kernels
                                                  each instead of one (needs ``arrive``)
``JAX_GARDEN_MOE_COOPERATIVE``          1         0: the fused kernels get a plain launch instead
                                                  of a cooperative one (benchmarks)
``JAX_GARDEN_VMM_IPC``                  1         0: engines created from now on stop offering
                                                  GPU regions in cuMemCreate memory (XLA's
                                                  buffers) to same-host peers through an
                                                  exported fd (their writes then go staged)
``JAX_GARDEN_IPC_COPY_KERNEL_BYTES``    0         engines created from now on without an
                                                  ``ipc_copy_kernel_bytes=`` argument send ipc
                                                  single writes of at most this many bytes
                                                  (16-byte aligned, up to 8 pieces) as one copy
                                                  kernel that also stores their imm records
                                                  (less host work, but it needs free SMs); 0:
                                                  always the driver's copy and a stream write
``JAX_GARDEN_ADVERSARY``                (off)     engines created from now on without an
                                                  ``adversary=`` argument run the adversarial
                                                  delivery mode with these settings, e.g.
                                                  ``seed=7`` or ``seed=7,hold=0.5,reset=0.1``
                                                  (read by the native engine; docs/testing.md)
======================================  ========  ===========================================
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple


class Setting(NamedTuple):
    env: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "")


def _count(text: str) -> int:
    n = int(text.strip())
    if n < 0:
        raise ValueError(f"must be >= 0, got {n}")
    return n


SETTINGS: dict[str, Setting] = {
    "tcp_node": Setting("JAX_GARDEN_TCP_NODE", str, "127.0.0.1",
                        "address the tcp provider binds when TransferEngine(node=None)"),
    "moe_timeout_s": Setting("JAX_GARDEN_MOE_TIMEOUT_S", float, 30.0, "default bound of every MoE kernel wait (s)"),
    "moe_chunk_bytes": Setting("JAX_GARDEN_MOE_CHUNK_BYTES", int, None, "CUDA MoE: bytes per copy chunk"),
    "moe_blocks_per_sm": Setting("JAX_GARDEN_MOE_BLOCKS_PER_SM", int, None, "CUDA MoE: thread blocks per SM"),
    "moe_cuda_graphs": Setting("JAX_GARDEN_MOE_CUDA_GRAPHS", _flag, True,
                               "0: MoE CUDA calls traced from now on use the targets without the "
                               "command-buffer trait (no CUDA graphs)"),
    "moe_legacy_sync": Setting("JAX_GARDEN_MOE_LEGACY_SYNC", _flag, False,
                               "1: CUDA MoE contexts created from now on use the NVLink kernels' first "
                               "synchronisation (a fence in every thread, the full grid for every kernel)"),
    "moe_sync": Setting("JAX_GARDEN_MOE_SYNC", str, "arrive",
                        "CUDA MoE contexts created from now on synchronise their NVLink kernels by 'arrive', "
                        "'flags' or 'legacy'"),
    "moe_fused": Setting("JAX_GARDEN_MOE_FUSED", _flag, True,
                         "0: CUDA MoE contexts created from now on run dispatch()/combine() as two kernels each"),
    "moe_cooperative": Setting("JAX_GARDEN_MOE_COOPERATIVE", _flag, True,
                               "0: the fused MoE kernels get a plain launch instead of a cooperative one"),
    "vmm_ipc": Setting("JAX_GARDEN_VMM_IPC", _flag, True,
                       "0: engines created from now on stop offering GPU regions in cuMemCreate memory (XLA's "
                       "buffers) to same-host peers through an exported fd (their writes then go staged)"),
    "ipc_copy_kernel_bytes": Setting("JAX_GARDEN_IPC_COPY_KERNEL_BYTES", _count, 0,
                                     "engines created without ipc_copy_kernel_bytes= send ipc single writes of at "
                                     "most this many bytes as one copy kernel that also stores their imm records "
                                     "(less host work, needs free SMs); 0: always the driver's copy and a stream "
                                     "write"),
    "adversary": Setting("JAX_GARDEN_ADVERSARY", str, "",
                         "engines created without adversary= run the adversarial delivery mode with these "
                         "settings (seed=7,hold=0.5,...); read by the native engine when it is created"),
}


def get(name: str) -> Any:
    """The current value of setting ``name`` (its environment variable if set, else the default).
    A malformed value raises ValueError naming the variable."""
    s = SETTINGS[name]
    raw = os.environ.get(s.env)
    if raw is None:
        return s.default
    try:
        return s.parse(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {s.env}={raw!r} is not valid: {e}") from None
