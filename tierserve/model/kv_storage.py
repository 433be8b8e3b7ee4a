"""KVStorage owns the KV block tensors of every tier; SwapWorker runs tier copies in the background.

Every tier has the runner's block-major layout, only the number of blocks differs:

    device  (num_blocks,      num_layers, 2, block_size, num_kv_heads, head_dim)  runner.kv_cache
    host    (num_host_blocks, ...same...)   pinned when the device tensor is on CUDA
    disk    (num_disk_blocks, ...same...)   a np.memmap file in swap_dir, removed on close

A run of neighbouring block ids is one contiguous region in each tier, so each ``CopyRun`` of a
``SwapOp`` is exactly one tensor copy. The scheduler chooses block ids; this module only copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tierserve.kv.tiers_types import SwapOp, Tier
from tierserve.sched.plan import CopyError


class KVStorage:
    """The KV blocks of every tier: the device tensor (the runner's kv_cache), a host tensor
    (pinned when the device tensor is on CUDA), and an optional disk tier: a np.memmap file
    under ``swap_dir``, deleted on close."""

    def __init__(self, device_cache: torch.Tensor, num_host_blocks: int, num_disk_blocks: int = 0,
                 swap_dir: str | None = None) -> None:
        if not device_cache.is_contiguous():
            raise ValueError("the device KV cache must be contiguous (one region per block run)")
        if num_host_blocks < 0 or num_disk_blocks < 0:
            raise ValueError(f"tier sizes must be >= 0, got host={num_host_blocks}, "
                             f"disk={num_disk_blocks}")
        block_shape = tuple(device_cache.shape[1:])
        self.bytes_per_block = device_cache[0].numel() * device_cache.element_size()
        self._tensors: dict[Tier, torch.Tensor] = {
            Tier.DEVICE: device_cache,
            Tier.HOST: torch.empty((num_host_blocks, *block_shape), dtype=device_cache.dtype,
                                   pin_memory=device_cache.is_cuda),
        }
        self.swap_path: str | None = None
        self._remove_file: weakref.finalize | None = None
        if num_disk_blocks > 0:
            if swap_dir is None:
                raise ValueError(f"a disk tier of {num_disk_blocks} blocks needs a swap_dir to "
                                 "hold its file; pass swap_dir or set num_disk_blocks=0")
            self.swap_path = _preallocated_file(swap_dir, num_disk_blocks * self.bytes_per_block)
            # Removes the file even if close() is never called (e.g. an engine that crashed).
            self._remove_file = weakref.finalize(self, _remove, self.swap_path)
            self._tensors[Tier.DISK] = _memmap_tensor(
                self.swap_path, (num_disk_blocks, *block_shape), device_cache.dtype)

    @property
    def cuda_device(self) -> torch.device | None:
        """The device tier's GPU, or None on CPU."""
        device_cache = self.tensor(Tier.DEVICE)
        return device_cache.device if device_cache.is_cuda else None

    def tensor(self, tier: Tier) -> torch.Tensor:
        """The whole tier as one tensor, indexed by block id; the disk tier is a view of the
        memmap, so writes through it land in the file."""
        tensor = self._tensors.get(Tier(tier))
        if tensor is None:
            raise KeyError(f"this KVStorage has no {Tier(tier).value} tier (closed, or sized 0)")
        return tensor

    def num_blocks(self, tier: Tier) -> int:
        return 0 if Tier(tier) not in self._tensors else self._tensors[Tier(tier)].shape[0]

    def copy(self, op: SwapOp, non_blocking: bool = False) -> int:
        """Run ``op``: one tensor copy per run, in order. Returns the bytes moved.

        Synchronous unless ``non_blocking`` (CUDA only; the caller then synchronizes its
        stream). Every run is checked before any copy starts, so a bad op copies nothing.
        """
        src, dst = self.tensor(op.src_tier), self.tensor(op.dst_tier)
        for run in op.runs:
            _check_range(op.src_tier, src, run.src_start, run.length)
            _check_range(op.dst_tier, dst, run.dst_start, run.length)
        # inference_mode: the runner's forward may have made the cache an inference tensor.
        with torch.inference_mode():
            for run in op.runs:
                dst[run.dst_start: run.dst_start + run.length].copy_(
                    src[run.src_start: run.src_start + run.length], non_blocking=non_blocking)
        # NOTE: no memmap flush: the disk tier is scratch space read back by this process
        # through the same shared mapping (the page cache), never after a crash; msync on every
        # swap would only add latency. The kernel writes dirty pages back when memory is needed.
        return op.num_blocks * self.bytes_per_block

    def close(self) -> None:
        """Drop the host and disk tensors and delete the disk file. Idempotent."""
        self._tensors = {Tier.DEVICE: self._tensors[Tier.DEVICE]}
        if self._remove_file is not None:
            self._remove_file()

    def __enter__(self) -> KVStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(slots=True)
class SwapStats:
    """One finished ``submit``: what it moved and how long its copies took (wall seconds)."""

    key: str
    num_blocks: int
    num_copies: int
    bytes: int
    seconds: float
    error: str | None = None  # the copy failed (its destination holds nothing usable)


@dataclass(slots=True)
class _Job:
    key: str
    ops: list[SwapOp]
    ready: torch.cuda.Event | None  # recorded on the submitter's stream (CUDA only)


class SwapWorker:
    """Runs SwapOps on a background thread (on CUDA: its own stream), so copies overlap the
    model step. Jobs run FIFO on one thread, so the ops of one key keep their order.

    On CUDA a job first waits for all work queued on the submitter's stream at ``submit`` time
    (a swap-out must not read blocks the current step is still writing), and counts as finished
    only after its stream has synchronized.
    """

    def __init__(self, storage) -> None:
        # ``storage``: anything with ``copy(op, non_blocking) -> bytes`` and ``cuda_device`` (a
        # KVStorage, or the expert tiers' ExpertOffload); ops need ``num_blocks`` and ``runs``.
        self.storage = storage
        self._device = storage.cuda_device
        self._stream = torch.cuda.Stream(self._device) if self._device is not None else None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}  # key -> submits not finished yet
        self._errors: dict[str, Exception] = {}  # key -> first copy error, until wait raises it
        self._finished: list[SwapStats] = []  # since the last poll
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tierserve-swap", daemon=True)
        self._thread.start()

    def submit(self, key: str, ops: list[SwapOp]) -> None:
        """Queue ``ops`` (run in order) under ``key``, e.g. a request id."""
        if self._closed:
            raise RuntimeError(f"submit({key!r}) after SwapWorker.close()")
        ready = None
        if self._device is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
        with self._cond:
            self._pending[key] = self._pending.get(key, 0) + 1
        self._queue.put(_Job(key, list(ops), ready))

    def wait(self, keys: Iterable[str]) -> None:
        """Block until every submit under ``keys`` has finished, then raise CopyError naming
        those of them that failed (once; ``poll`` still lists them). Unknown or already
        finished keys return at once."""
        keys = set(keys)
        with self._cond:
            self._cond.wait_for(lambda: keys.isdisjoint(self._pending))
            failed = {key: self._errors.pop(key) for key in sorted(keys) if key in self._errors}
        if failed:
            raise CopyError({key: f"{type(exc).__name__}: {exc}" for key, exc in failed.items()})

    def poll(self) -> list[SwapStats]:
        """Submits finished since the last poll, one SwapStats per submit, in finishing order;
        a failed one is listed too, with its ``error`` (never raised here: the caller releases
        what the copy held and fails its request)."""
        with self._cond:
            finished, self._finished = self._finished, []
            for stats in finished:
                self._errors.pop(stats.key, None)  # reported: its request is failed upstream
        return finished

    def close(self) -> None:
        """Finish the queued jobs, then stop and join the thread. The storage stays open."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> SwapWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        one_intra_op_thread()
        while (job := self._queue.get()) is not None:
            start = time.perf_counter()
            error: Exception | None = None
            moved = 0
            try:
                moved = self._execute(job)
            except Exception as exc:  # handed to the caller's thread by wait/poll
                error = exc
            stats = SwapStats(job.key, sum(op.num_blocks for op in job.ops),
                              sum(len(op.runs) for op in job.ops), moved,
                              time.perf_counter() - start)
            with self._cond:
                self._pending[job.key] -= 1
                if self._pending[job.key] == 0:
                    del self._pending[job.key]
                if error is not None:
                    self._errors.setdefault(job.key, error)
                    stats.error = f"{type(error).__name__}: {error}"
                self._finished.append(stats)
                self._cond.notify_all()

    def _execute(self, job: _Job) -> int:
        if self._stream is None:
            return sum(self.storage.copy(op) for op in job.ops)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(job.ready)
            moved = sum(self.storage.copy(op, non_blocking=True) for op in job.ops)
        self._stream.synchronize()
        return moved


@functools.cache
def _openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp, libiomp5 or libomp), found in this process's
    memory map; None where there is no map (not Linux) or no OpenMP runtime."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line and any(
                name in line for name in ("libgomp", "libiomp5", "libomp"))}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
            library.omp_set_num_threads  # noqa: B018 - the symbol must exist
        except (OSError, AttributeError):
            continue
        return library
    return None


def one_intra_op_thread() -> None:
    """Make torch ops on the calling (background) thread run on one thread.

    A torch op on a second Python thread starts a second OpenMP team of torch's thread count;
    its threads spin after each parallel region and take the cores from the team running the
    model. Measured on 2 cores: batch-1 decode steps went from 8.5 to 13.3 ms, for good, once
    the swap thread had copied a block. ``torch.set_num_threads`` is process-wide, so it cannot
    be used; OpenMP's own ``omp_set_num_threads`` is per thread. ATen's per-thread lazy init
    would reset it, so it runs first (``torch.get_num_threads``)."""
    torch.get_num_threads()
    library = _openmp_library()
    if library is not None:
        library.omp_set_num_threads(1)


def _check_range(tier: Tier, tensor: torch.Tensor, start: int, length: int) -> None:
    # Slicing past the end silently shortens a slice, and copy_ would then broadcast one block
    # over several: an out-of-range run must fail loudly instead.
    if start + length > tensor.shape[0]:
        raise IndexError(f"copy run of blocks {start}..{start + length - 1} is out of range for "
                         f"the {tier.value} tier ({tensor.shape[0]} blocks)")


def _preallocated_file(swap_dir: str, size: int) -> str:
    """A new file of ``size`` bytes with its disk space reserved: writing into a sparse mapped
    file on a full disk kills the process with SIGBUS, so fail here with a clear error instead."""
    fd, path = tempfile.mkstemp(prefix="tierserve-kv-", suffix=".swap", dir=swap_dir)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        _remove(path)
        raise OSError(f"cannot reserve {size / 2**30:.2f} GiB for the disk KV tier in {swap_dir} "
                      f"({exc.strerror}); lower num_disk_blocks or choose another swap_dir") from exc
    os.close(fd)
    return path


def _memmap_tensor(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A torch view of a memmap of ``path``. numpy has no bfloat16 (or float8): such dtypes are
    stored as unsigned ints of the same width and viewed back, which keeps the bytes as is."""
    try:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        np_dtype = np.dtype(f"u{torch.empty(0, dtype=dtype).element_size()}")
    # r+ keeps the preallocated file; w+ would truncate it and make it sparse again.
    array = np.memmap(path, dtype=np_dtype, mode="r+", shape=shape)
    return torch.from_numpy(array).view(dtype)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
