"""TransferEngine: one-sided RDMA writes with immediate data over libfabric, for JAX programs.

One engine drives one device group: ``domains`` NICs (on ``tcp``, loopback endpoints stand in for
NICs) with one progress worker thread, a callback thread and, when watchers exist, a watcher thread.

Completion model (reliable, **unordered** delivery): the sender learns that an op finished from its
:class:`Transfer`; the receiver learns it only by counting immediate values (imms). Each op delivers
a known number of imm-carrying writes to each destination, given by :func:`imm_writes`; receivers
wait for that many on an :class:`ImmCounter`. Counters have credit semantics: arrivals that come
before anyone waits (even before the counter is created) are kept.

Every wait takes a timeout; a dead or silent peer fails every pending op toward it within the
engine's ``timeout`` (plus ``bytes / 200 MB/s`` for large ops) with :class:`TransferError` or
``TimeoutError``. Bad arguments raise ``ValueError`` before anything is posted.

GPU memory: ``register`` accepts GPU buffers (jax arrays on a GPU, ``__cuda_array_interface__``
objects, ``(pointer, nbytes)`` with ``memory="cuda"``) and every op picks a path per destination:

* ``"ipc"``: both regions GPU memory on one host and the GPUs can map each other: CUDA IPC, copies
  on the engine's own streams (a copy kernel for paged writes); the imms are delivered through
  libfabric only after the copy completed.
* ``"fabric"``: libfabric RMA, when both regions are registered with the provider (host memory, or
  GPU memory on a provider with ``FI_HMEM`` such as efa or verbs with GPUDirect).
* ``"staged"``: through pinned host bounce buffers where the provider cannot reach a region (GPU
  memory on ``tcp``): device-to-host into a bounded pool before sending, and at the receiver a
  rendezvous for its bounce slots and a host-to-device copy before the imms count.

Receivers count imms exactly as :func:`imm_writes` says on every path. ``path=`` on the engine or
per op forces a path (``ValueError`` if impossible); ``register(..., staged=True)`` makes host
memory take the staged path too (how the CPU tests exercise it). ``path_for`` tells what an op
would take.

jit ops: :func:`signal` stores into a watcher slot in program order, :func:`wait` blocks a program
until an imm counter reaches a count. Both pass operands through so callers can order work on them.
Both run on CPU and on CUDA (see their docstrings for the GPU semantics).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jax_garden import _ffi, _lifetime, _settings
from jax_garden._adversary import Adversary
from jax_garden._jax_garden import fabric as _native
from jax_garden._validate import (U32_MAX, check_bytes_like, check_choice, check_float, check_instance, check_int,
                                  check_positive_int)

NetAddress = _native.NetAddress
MemoryDescriptor = _native.MemoryDescriptor
Transfer = _native.Transfer
ImmCounter = _native.ImmCounter
TransferError = _native.TransferError

DEFAULT_TIMEOUT = 10.0
DEFAULT_SPLIT_THRESHOLD = 1 << 20
IMM_MAX = (1 << 32) - 1

PATHS = (None, "fabric", "ipc", "staged")
COMPLETIONS = ("delivery", "transmit")

__all__ = [
    "TransferEngine", "NetAddress", "MemoryDescriptor", "MemoryRegion", "Transfer", "ImmCounter",
    "Watcher", "WatcherSlot", "TransferError", "imm_writes", "signal", "wait", "choose_path",
    "plan_registration", "gpu_available", "Adversary",
]


def _check_path(path: Any) -> str:
    return check_choice("path", path, PATHS) or ""


def gpu_available() -> bool:
    """True when this build has CUDA support and a GPU is usable in this process."""
    return bool(_native.gpu_available())


def choose_path(*, requested: str | None = None, src_cuda: bool = False, src_staged: bool = False,
                dst_cuda: bool = False, dst_staged: bool = False, dst_has_ipc: bool = False,
                same_host: bool = False, same_process: bool = False, gpu_can_map: bool = False,
                dst_mailbox: bool = True, why: bool = False) -> tuple:
    """The engine's path decision for one destination, as a pure function:
    ``(path, stage_src, stage_dst)``, plus the reason in words with ``why=True``. ``dst_mailbox``:
    the destination engine has an imm mailbox (where same-host copies deliver their imms). Raises
    ``ValueError`` when a forced path is impossible."""
    out = tuple(_native.choose_path(_check_path(requested), src_cuda, src_staged, dst_cuda, dst_staged,
                                    dst_has_ipc, same_host, same_process, gpu_can_map, dst_mailbox))
    return out if why else out[:3]


def plan_registration(*, cuda: bool, device: int = 0, staged: bool = False, provider_hmem: bool = False,
                      headers_dmabuf: bool = False, runtime_dmabuf: bool = False, kernel_dmabuf: bool = False,
                      device_dmabuf: bool = False) -> dict:
    """How a region would be registered with the provider (pure): ``mode`` is ``system``,
    ``hmem_iov`` (FI_HMEM_CUDA, pinned by the provider), ``hmem_dmabuf`` (FI_HMEM_CUDA + DMA-BUF fd,
    libfabric >= 1.20 headers and runtime, Linux >= 5.12, a GPU exporting DMA-BUF) or ``staged``;
    plus the ``fi_mr_attr`` ``iface``/``device``/``access`` and the ``fi_mr_regattr`` ``flags``."""
    return dict(_native.plan_registration(cuda, device if cuda else -1, staged, provider_hmem, headers_dmabuf,
                                          runtime_dmabuf, kernel_dmabuf, device_dmabuf))


def _check_count(name: str, value: Any, *, positive: bool = False) -> int:
    return check_int(name, value, minimum=1 if positive else 0)


def _check_imm(imm: Any, *, required: bool = False) -> int | None:
    if imm is None:
        if required:
            raise ValueError("imm is required for this operation")
        return None
    return check_int("imm", imm, maximum=U32_MAX)


def _descriptor(d: Any, what: str = "remote_descriptor") -> MemoryDescriptor:
    if isinstance(d, MemoryDescriptor):
        return d
    if isinstance(d, (bytes, bytearray, memoryview)):
        return MemoryDescriptor.from_bytes(d)
    raise TypeError(f"{what} must be a fabric.MemoryDescriptor or its bytes, got {type(d).__name__}")


def _address(a: Any) -> NetAddress:
    if isinstance(a, NetAddress):
        return a
    if isinstance(a, (bytes, bytearray, memoryview)):
        return NetAddress.from_bytes(a)
    raise TypeError(f"address must be a fabric.NetAddress or its bytes, got {type(a).__name__}")


def _page_list(name: str, pages: Any) -> np.ndarray:
    arr = np.asarray(pages)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of page indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype != np.uint32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 0xFFFFFFFF:
            raise ValueError(f"{name} holds index {lo if lo < 0 else hi} outside 0..2^32-1")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def imm_writes(op: str, *, domains: int, length: int = 0, pages: int = 0, sharding: str = "targets",
               split_threshold: int = DEFAULT_SPLIT_THRESHOLD) -> int:
    """Imm-carrying writes that ONE destination receives from one op (the accounting function).

    ``domains`` is the *sender's* domain count (``NetAddress.num_domains`` / ``eng.num_domains``).

    =============  ====================================================================
    op             imm writes per destination
    =============  ====================================================================
    ``"write"``    ``domains`` if ``length >= split_threshold`` (the write is cut into one
                   piece per domain), else 1
    ``"paged"``    ``pages`` (one write per page)
    ``"scatter"``  1 per target with ``sharding="targets"``, ``domains`` per target with
                   ``sharding="bytes"`` (zero-length pieces are still sent)
    ``"imm"``      1
    ``"barrier"``  1 per peer
    =============  ====================================================================

    The engine cuts its ops with the same C++ planner this calls, so the counts match by
    construction.
    """
    return int(_native.imm_writes(op, check_int("domains", domains, minimum=1, maximum=8),
                                  _check_count("length", length), _check_count("pages", pages), sharding,
                                  _check_count("split_threshold", split_threshold, positive=True)))


class MemoryRegion:
    """A registered local buffer. Unregisters when dropped; the registered object (the buffer) is
    kept alive until the engine has closed the registration, so a late write never lands in freed
    memory."""

    def __init__(self, native: Any, is_cuda: bool):
        self._native = native
        self.is_cuda = is_cuda

    @property
    def is_staged(self) -> bool:
        """Not registered with the provider: data moves through bounce buffers."""
        return self._native.is_staged

    @property
    def device(self) -> int:
        """CUDA device ordinal (-1 for host memory)."""
        return self._native.device

    @property
    def registration(self) -> str:
        """``system``, ``hmem_iov``, ``hmem_dmabuf`` or ``staged`` (see :func:`plan_registration`)."""
        return self._native.registration

    @property
    def registration_note(self) -> str:
        """Why the region is registered the way it is, and (GPU memory) why same-host peers can or
        cannot map it (e.g. memory without a CUDA IPC export: a ``cuda_async`` pool)."""
        return self._native.registration_note

    @property
    def descriptor(self) -> MemoryDescriptor:
        return self._native.descriptor

    @property
    def length(self) -> int:
        return self._native.length

    @property
    def base(self) -> int:
        return self._native.base

    def __repr__(self) -> str:
        return (f"MemoryRegion(base=0x{self.base:x}, length={self.length}{', cuda' if self.is_cuda else ''}"
                f"{', staged' if self.is_staged else ''})")


class WatcherSlot:
    """One 64-bit slot of a watcher; ``fabric.signal(slot, v)`` stores into it from a jit program."""

    def __init__(self, watcher: "Watcher", index: int):
        self.watcher = watcher
        self.index = index
        self.address = watcher._native.slot_address(index)

    @property
    def value(self) -> int:
        return self.watcher._native.read(self.index)

    def store(self, value: int) -> None:
        self.watcher._native.store(self.index, _check_count("value", value))

    def __repr__(self) -> str:
        return f"WatcherSlot({self.index}, value={self.value})"


class Watcher:
    """Slots polled by the engine; ``callback(slot, old, new)`` runs on the callback thread when a
    slot changes (changes between two polls coalesce)."""

    num_slots = _native.Watcher.num_slots

    def __init__(self, native: Any, engine: "TransferEngine"):
        self._native = native
        self._engine = engine  # the slots live as long as the engine's watcher thread knows them

    def slot(self, index: int) -> WatcherSlot:
        index = _check_count("slot index", index)
        if index >= self.num_slots:
            raise ValueError(f"slot index {index} out of range: a watcher has {self.num_slots} slots")
        return WatcherSlot(self, index)


class TransferEngine:
    """One-sided RDMA writes with imm data over libfabric.

    Args:
      provider: ``"tcp"``, ``"efa"``, ``"verbs"``, ``"shm"``, a full libfabric name, or None for
        auto (efa > verbs;ofi_rxm > tcp).
      domains: NICs in the group (1..8); large writes are split across them.
      node: source address to bind. For ``tcp`` the default is ``127.0.0.1`` (set
        ``JAX_GARDEN_TCP_NODE`` or pass ``node`` for a real interface); other providers pick.
      timeout: seconds after which an op toward a silent peer fails (large ops get
        ``bytes / 200 MB/s`` more).
      max_message_bytes: largest two-sided control message (header included).
      split_threshold: single writes at least this long are cut into one piece per domain.
      path: default path for every op (None = choose per destination; ``"fabric"``, ``"ipc"``,
        ``"staged"`` force one); ops take a ``path=`` override too.
      staging_chunk_bytes: size of one bounce buffer / bounce slot (multiple of 4096).
      staging_slots: bounce buffers on each side (local source staging, and slots peers write into);
        the pools are allocated (pinned when a GPU exists) on first use.
      completion: ``"delivery"`` (default): a Transfer completes once the target placed the data, so
        no op is reported successful while its bytes did not land; ``"transmit"``: once the source
        may be reused (the provider's default; faster on tcp, where a write the peer never placed
        can then be reported successful). Receivers always learn placement by counting imms.
      adversary: the adversarial delivery mode for testing protocols (``jax_garden._adversary``,
        docs/testing.md): ``"seed=7,hold=0.5,..."``, or ``""`` for off; None (default) reads
        ``JAX_GARDEN_ADVERSARY`` (unset: off). Off costs nothing.
      ipc_copy_kernel_bytes: ``ipc`` single writes (and a scatter's run toward one region) of at
        most this many bytes, 16-byte aligned, go as one copy kernel that also stores their imm
        records: less host work per write than the driver's copy followed by a stream write, but
        the copy then needs free SMs (the driver's same-device copy does not), so a kernel of this
        process that spins waiting for such a write's bytes must leave room for it. 0 (off):
        always the driver's copy. None (default) reads ``JAX_GARDEN_IPC_COPY_KERNEL_BYTES``
        (unset: 0). docs/ipc.md.

    Memory: each domain pre-posts ``16 x max_message_bytes`` of control-message receive buffers;
    on ``tcp`` libfabric's ``ofi_rxm`` layer adds its own buffer pools: an engine costs about
    70 MiB per domain before any registration (measured: 73 MiB with 1 domain, 277 MiB with 4).
    """

    def __init__(self, provider: str | None = None, domains: int = 1, *, node: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = 256 * 1024,
                 split_threshold: int = DEFAULT_SPLIT_THRESHOLD, path: str | None = None,
                 staging_chunk_bytes: int = 1 << 20, staging_slots: int = 8, completion: str = "delivery",
                 adversary: str | None = None, ipc_copy_kernel_bytes: int | None = None):
        if provider is not None:
            check_instance("provider", provider, str)
        domains = check_int("domains", domains, minimum=1, maximum=8)
        timeout = check_float("timeout", timeout)
        if node is None:
            node = _settings.get("tcp_node") if provider in ("tcp", "tcp;ofi_rxm") else ""
        check_instance("node", node, str)
        check_choice("completion", completion, COMPLETIONS)
        if adversary is not None:
            check_instance("adversary", adversary, str)
        if ipc_copy_kernel_bytes is None:
            ipc_copy_kernel_bytes = _settings.get("ipc_copy_kernel_bytes")
        ipc_copy_kernel_bytes = _check_count("ipc_copy_kernel_bytes", ipc_copy_kernel_bytes)
        self._native = _native.Engine.create(provider or "", node, domains, timeout,
                                             _check_count("max_message_bytes", max_message_bytes, positive=True),
                                             _check_count("split_threshold", split_threshold, positive=True),
                                             _check_path(path),
                                             _check_count("staging_chunk_bytes", staging_chunk_bytes, positive=True),
                                             _check_count("staging_slots", staging_slots, positive=True), completion,
                                             bool(_settings.get("vmm_ipc")), adversary, ipc_copy_kernel_bytes)
        _lifetime.close_at_exit(self, _lifetime.ENGINE)

    # -- properties ----------------------------------------------------------------------------
    @property
    def address(self) -> NetAddress:
        return self._native.address

    @property
    def provider(self) -> str:
        return self._native.provider

    @property
    def num_domains(self) -> int:
        return self._native.num_domains

    @property
    def timeout(self) -> float:
        return self._native.timeout

    @property
    def split_threshold(self) -> int:
        return self._native.split_threshold

    @property
    def completion(self) -> str:
        """``"delivery"`` or ``"transmit"`` (see the class docstring)."""
        return self._native.completion

    @property
    def adversary(self) -> Adversary | None:
        """The adversarial delivery mode of this engine (its settings, what it did, targeted holds),
        or None when it is off."""
        return Adversary(self._native) if self._native.adversary is not None else None

    @property
    def supports_gpu_memory(self) -> bool:
        return self._native.supports_gpu_memory

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def default_path(self) -> str | None:
        p = self._native.default_path
        return None if p == "auto" else p

    def path_for(self, region: "MemoryRegion", remote_descriptor: Any, path: str | None = None, *,
                 why: bool = False) -> "str | tuple[str, str]":
        """The path (``"fabric"``, ``"ipc"`` or ``"staged"``) an op from ``region`` to
        ``remote_descriptor`` takes with this ``path`` override; with ``why=True``, ``(path, reason)``
        where the reason says what ruled the faster paths out (e.g. a destination GPU this process
        cannot see, or memory its owner could not export)."""
        reg, desc, p = _region(region), _descriptor(remote_descriptor), _check_path(path)
        chosen = self._native.path_for(reg, desc, p)[0]
        return (chosen, self._native.path_reason(reg, desc, p)) if why else chosen

    def prepare(self, region: "MemoryRegion", remote_descriptor: Any, path: str | None = None) -> str:
        """Set up now what the first op from ``region`` to ``remote_descriptor`` would, and return its
        path. On the ``"ipc"`` path that maps the peer's GPU memory and claims a ring in its
        mailbox: a driver call that may wait for this process's GPU work, so make it before
        launching kernels that wait for data this engine sends, and the first write is no slower
        than the next. Raises TransferError when the destination cannot be mapped or is gone."""
        return self._native.prepare(_region(region), _descriptor(remote_descriptor), _check_path(path))

    def check(self) -> None:
        """Raise (TransferError) the oldest error noticed asynchronously and forget it: a GPU
        ``fabric.wait`` whose imms did not arrive within the timeout (its stream was released)."""
        self._native.check()

    def staging_stats(self) -> dict:
        """Bounce buffers and staged transfers in flight: ``send_buffers[_free]``,
        ``recv_slots[_free]``, ``inbound``, ``outbound``, ``chunk_bytes``; ``ipc_mappings``
        (peer allocations this process mapped) and the ipc destinations this engine started, by who
        stored their imm records: ``ipc_stream_records`` (the copy's GPU stream, no host thread),
        ``ipc_event_records`` (the worker, after the copy's event: no stream memory operations
        here), ``ipc_host_records`` (host memory); of the stream's, ``ipc_kernel_records`` were
        stored by the copy kernel itself (single writes up to ``ipc_copy_kernel_bytes``)."""
        return dict(self._native.staging_stats())

    # -- memory --------------------------------------------------------------------------------
    def register(self, obj: Any, *, memory: str | None = None, staged: bool = False) -> MemoryRegion:
        """Register a numpy array, a single-device jax array (host or GPU), an object with
        ``__cuda_array_interface__``, or a ``(pointer, nbytes)`` pair (host memory unless
        ``memory="cuda"``). The buffer must stay where it is: the region keeps ``obj`` alive.
        Remote peers write into it in place, behind JAX's back for jax arrays.

        GPU memory is registered with the provider when it has FI_HMEM (efa, verbs), else it is
        *staged* (writes go through pinned bounce buffers); either way it carries a CUDA IPC handle
        for peers on the same host. ``staged=True`` stages any region (host memory included)."""
        is_cuda = False
        check_choice("memory", memory, (None, "host", "cuda"))
        if isinstance(obj, tuple):
            if len(obj) != 2:
                raise ValueError(f"register((pointer, nbytes)) takes a pair, got {len(obj)} items")
            ptr, nbytes = _check_count("pointer", obj[0], positive=True), _check_count("nbytes", obj[1])
            is_cuda = memory == "cuda"
        elif isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise ValueError("register: the numpy array must be C-contiguous")
            if not obj.flags.writeable:
                raise ValueError("register: the numpy array is read-only; peers write into registered memory")
            ptr, nbytes = obj.__array_interface__["data"][0], obj.nbytes
        elif hasattr(obj, "__cuda_array_interface__"):
            cai = obj.__cuda_array_interface__
            if cai.get("strides") not in (None,):
                raise ValueError("register: the CUDA array must be C-contiguous")
            ptr = cai["data"][0]
            nbytes = int(np.prod(cai["shape"])) * np.dtype(cai["typestr"]).itemsize
            is_cuda = True
        elif hasattr(obj, "unsafe_buffer_pointer") and hasattr(obj, "devices"):
            devices = list(obj.devices())
            if len(devices) != 1:
                raise ValueError(f"register: a jax array must live on one device, this one spans {len(devices)}")
            ptr, nbytes = obj.unsafe_buffer_pointer(), obj.nbytes
            is_cuda = devices[0].platform != "cpu"
        else:
            raise TypeError(f"register: cannot register {type(obj).__name__}; pass a numpy array, a jax array, "
                            "a CUDA array or (pointer, nbytes)")
        if nbytes <= 0:
            raise ValueError(f"register: the buffer is empty ({nbytes} bytes)")
        # The native side looks the CUDA device up from the pointer, and keeps `obj` alive until the
        # registration is closed.
        native = self._native.register_memory(ptr, nbytes, is_cuda, bool(staged), obj)
        return MemoryRegion(native, is_cuda)

    # -- one-sided operations -------------------------------------------------------------------
    def write(self, region: MemoryRegion, remote_descriptor: Any, length: int, src_offset: int = 0,
              dst_offset: int = 0, imm: int | None = None, *, path: str | None = None) -> Transfer:
        """Write ``length`` bytes from ``region[src_offset:]`` to the remote region at ``dst_offset``.
        Delivers ``imm_writes("write", domains=self.num_domains, length=length)`` imms."""
        if (type(region) is MemoryRegion and type(remote_descriptor) is MemoryDescriptor and type(length) is int
                and type(src_offset) is int and type(dst_offset) is int and (imm is None or type(imm) is int)
                and path is None):
            # Fast path (small writes are latency-bound): the native binding checks ranges itself;
            # a negative or oversized number fails its conversion and takes the checked path below.
            try:
                return self._native.write(region._native, remote_descriptor, length, src_offset, dst_offset, imm, "")
            except TypeError:
                pass
        return self._native.write(_region(region), _descriptor(remote_descriptor), _check_count("length", length),
                                  _check_count("src_offset", src_offset), _check_count("dst_offset", dst_offset),
                                  _check_imm(imm), _check_path(path))

    def write_paged(self, region: MemoryRegion, remote_descriptor: Any, page_bytes: int,
                    src_pages: Sequence[int], dst_pages: Sequence[int], src_stride: int, dst_stride: int,
                    src_offset: int = 0, dst_offset: int = 0, imm: int | None = None, *,
                    path: str | None = None) -> Transfer:
        """Page i moves ``page_bytes`` from ``src_offset + src_pages[i]*src_stride`` to
        ``dst_offset + dst_pages[i]*dst_stride``. One imm per page."""
        return self._native.write_paged(_region(region), _descriptor(remote_descriptor),
                                        _check_count("page_bytes", page_bytes, positive=True),
                                        _page_list("src_pages", src_pages), _page_list("dst_pages", dst_pages),
                                        _check_count("src_stride", src_stride), _check_count("dst_stride", dst_stride),
                                        _check_count("src_offset", src_offset), _check_count("dst_offset", dst_offset),
                                        _check_imm(imm), _check_path(path))

    def scatter(self, region: MemoryRegion, targets: "Iterable[tuple[Any, int, int, int]] | ScatterTargets",
                imm: int | None = None, *, sharding: str = "targets", path: str | None = None) -> Transfer:
        """One source, many destinations: ``targets`` = ``[(remote_descriptor, length, src_offset,
        dst_offset), ...]``, or a :class:`ScatterTargets` built once from such a list (posting the
        same list again then skips its per-target conversion). ``sharding="targets"`` spreads
        targets over domains (1 imm each), ``"bytes"`` cuts every target over all domains
        (``num_domains`` imms each)."""
        if isinstance(targets, ScatterTargets):
            return self._native.scatter_prepared(_region(region), targets._native, sharding, _check_imm(imm),
                                                 _check_path(path))
        return self._native.scatter(_region(region), _scatter_targets(targets), sharding, _check_imm(imm),
                                    _check_path(path))

    def write_imm(self, remote_descriptor: Any, imm: int) -> Transfer:
        """A zero-byte write that delivers only ``imm`` to the owner of ``remote_descriptor``."""
        if type(remote_descriptor) is MemoryDescriptor and type(imm) is int:
            try:  # fast path, as in write()
                return self._native.write_imm(remote_descriptor, imm)
            except TypeError:
                pass
        return self._native.write_imm(_descriptor(remote_descriptor), _check_imm(imm, required=True))

    def barrier(self, remote_descriptors: Iterable[Any], imm: int) -> Transfer:
        """Deliver ``imm`` once to each peer. A full barrier: every member calls
        ``barrier(others, imm)`` then ``imm_counter(imm).wait(len(others))``."""
        peers = [_descriptor(d) for d in remote_descriptors]
        return self._native.barrier(peers, _check_imm(imm, required=True))

    # -- two-sided control messages -------------------------------------------------------------
    def send(self, address: Any, payload: bytes) -> Transfer:
        """A two-sided control message (at most ``max_message_bytes`` with its header) to the engine
        at ``address``; it arrives through that engine's ``recv``."""
        return self._native.send(_address(address), check_bytes_like("send: payload", payload))

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Next control message's payload (TimeoutError if none arrives in time)."""
        return self._native.recv(check_float("timeout", timeout, allow_zero=True))[1]

    def recv_message(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[NetAddress, bytes]:
        """Next control message as ``(sender address, payload)``."""
        return self._native.recv(check_float("timeout", timeout, allow_zero=True))

    # -- completion ------------------------------------------------------------------------------
    def imm_counter(self, imm: int) -> ImmCounter:
        """The (one) credit counter of ``imm``: ``counter.wait(n, timeout)`` takes n arrivals."""
        return self._native.imm_counter(_check_imm(imm, required=True))

    def watcher(self, callback: Callable[[int, int, int], Any]) -> Watcher:
        if not callable(callback):
            raise TypeError("watcher: callback must be callable(slot, old, new)")
        return Watcher(self._native.watcher(callback), self)

    def close(self) -> None:
        """Fail every op in flight (TransferError), stop the threads, close the endpoints, and drop
        the watchers' callbacks. Idempotent; engines still open at interpreter exit are closed."""
        self._native.close()
        _lifetime.closed(self)

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferEngine({self.provider}, domains={self.num_domains}{', closed' if self.closed else ''})"


def _region(region: Any) -> Any:
    if not isinstance(region, MemoryRegion):
        raise TypeError(f"expected a MemoryRegion from TransferEngine.register, got {type(region).__name__}")
    return region._native


# ---------------------------------------------------------------------------------------------
# jit ops

def _passthrough_call(target: str, scalar: Any, operands: tuple, *, alias: bool, **attrs: Any) -> Any:
    import jax
    import jax.numpy as jnp

    ops = tuple(jnp.asarray(o) for o in operands) or (jnp.zeros((), jnp.uint32),)
    out_types = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in ops]
    aliases = {i + 1: i for i in range(len(ops))} if alias else {}
    call = jax.ffi.ffi_call(target, out_types, has_side_effect=True, input_output_aliases=aliases)
    results = call(scalar, *ops, **attrs)
    if not operands:
        return results[0]
    return results[0] if len(operands) == 1 else tuple(results)


def _static_int(x: Any) -> int:
    """x as a Python int if it is known at trace time (int, numpy integer), else -1."""
    if isinstance(x, (bool, np.bool_)):
        return -1
    if isinstance(x, (int, np.integer)):
        return int(x)
    return -1


def _scatter_targets(targets: Iterable[tuple[Any, int, int, int]], share_bytes: bool = False) -> list[tuple]:
    """Checked (descriptor, length, src_offset, dst_offset) tuples for the native scatter.
    ``share_bytes``: equal descriptor bytes become one descriptor object (checked once natively)."""
    out = []
    from_bytes: dict[bytes, MemoryDescriptor] = {}
    for i, t in enumerate(targets):
        if not isinstance(t, (tuple, list)) or len(t) != 4:
            raise TypeError(f"scatter target {i} must be (descriptor, length, src_offset, dst_offset), got {t!r}")
        d, n, so, do = t
        if share_bytes and isinstance(d, (bytes, bytearray, memoryview)):
            d = from_bytes.setdefault(bytes(d), _descriptor(d))
        out.append((_descriptor(d, f"scatter target {i} descriptor"), _check_count("length", n),
                    _check_count("src_offset", so), _check_count("dst_offset", do)))
    return out


class ScatterTargets:
    """Scatter destinations checked and converted once, for posting many times with
    :meth:`TransferEngine.scatter` (a weight push posts the same lists on every push).

    ``targets`` = ``[(remote_descriptor, length, src_offset, dst_offset), ...]``; the descriptors
    are copied (once per distinct descriptor object). The source region's bounds, the destination's
    provider and liveness are still checked at each scatter."""

    def __init__(self, targets: Iterable[tuple[Any, int, int, int]]):
        self._native = _native.ScatterTargets(_scatter_targets(targets, share_bytes=True))

    def __len__(self) -> int:
        return len(self._native)

    @property
    def nbytes(self) -> int:
        """Total bytes over all targets."""
        return self._native.nbytes

    @property
    def num_destinations(self) -> int:
        """Distinct destination descriptors."""
        return self._native.num_destinations

    def __repr__(self) -> str:
        return repr(self._native)


def signal(slot: WatcherSlot, value: Any, *after: Any) -> Any:
    """Store ``value`` (uint32, zero-extended into the 64-bit slot) into a watcher slot once every array in ``after`` is computed.

    Usable inside ``jax.jit``; has side effects, so XLA keeps it. Returns ``after`` (one array, a
    tuple, or a token scalar when none was given) so later work can depend on the signal.

    On GPU the store is enqueued on the program's stream after the work that computes ``after``
    (``cuStreamWriteValue64`` when ``value`` is a Python int, else a one-thread kernel reading the
    device scalar); the slot lives in host-mapped pinned memory and the engine's watcher thread
    sees it. No host thread blocks.
    """
    import jax.numpy as jnp

    if not isinstance(slot, WatcherSlot):
        raise TypeError(f"signal: slot must be a WatcherSlot from Watcher.slot(i), got {type(slot).__name__}")
    static = _static_int(value)
    if static > 0xFFFFFFFF:
        raise ValueError(f"signal: value must fit in 32 bits, got {static}")
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(f"signal: value must be a scalar, got shape {value.shape}")
    return _passthrough_call("jg_fabric_signal", value.astype(jnp.uint32), after, alias=True,
                             address=np.uint64(slot.address), static_value=np.int64(static))


def wait(counter: ImmCounter, count: Any, *operands: Any, timeout: float | None = None) -> Any:
    """Block the program until ``counter`` holds ``count`` credits, then take them.

    Returns ``operands``, copied after the wait, so whatever consumes the results sees memory as it
    was once the imms arrived (pass the registered destination array through to consume what a peer
    wrote into it).

    CPU: the program's thread blocks; a stall longer than ``timeout`` (default
    ``DEFAULT_TIMEOUT`` = 10 s) fails the program with an error, never a hang.

    GPU: ``count`` must be a Python int. When the op is enqueued, ``count`` credits are reserved
    (taken) and the stream waits (``cuStreamWaitValue64``, GEQ) on a host-mapped word that the
    engine's worker keeps equal to the counter's total arrivals; no host thread blocks. If the
    target is not reached within ``timeout`` after enqueueing, the worker releases the stream (it
    writes the target into the word, so the program continues, possibly on incomplete data) and
    records an error, which the next ``fabric.wait`` on this counter, ``ImmCounter.wait`` or
    ``TransferEngine.check()`` raises. The reserved credits stay taken: later arrivals pay them back
    first. Not usable inside CUDA graphs (command buffers): the target is computed at enqueue.
    """
    import jax.numpy as jnp

    if not isinstance(counter, ImmCounter):
        raise TypeError(f"wait: counter must be an ImmCounter from TransferEngine.imm_counter, "
                         f"got {type(counter).__name__}")
    static = _static_int(count)
    if isinstance(count, (int, np.integer)) and not isinstance(count, (bool, np.bool_)):
        check_int("wait: count", count, minimum=0, maximum=(1 << 31) - 1)  # carried as int32
    count = jnp.asarray(count)
    if count.shape != ():
        raise ValueError(f"wait: count must be a scalar, got shape {count.shape}")
    t = DEFAULT_TIMEOUT if timeout is None else check_float("wait: timeout", timeout)
    return _passthrough_call("jg_fabric_wait", count.astype(jnp.int32), operands, alias=False,
                             counter_id=np.uint64(counter.id), timeout=np.float64(t),
                             static_count=np.int64(static))


assert _ffi  # the FFI targets are registered on import of jax_garden
