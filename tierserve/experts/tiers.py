"""Where experts live off the fast tier: host memory (the model dtype, or Q8/Q4 dequantized on
load) or disk (read from the checkpoint's own files on every load: safetensors tensors, or one
expert's slice of a GGUF file's stacked ``ffn_{gate,up,down}_exps``, dequantized on load).

Disk reads are honest: ``drop_page_cache`` asks the kernel to forget the files' cached pages
(``posix_fadvise(DONTNEED)``) so a benchmark's first loads really come from the disk. A missing
or truncated file is an ``ExpertTierError`` that names it: at start-up when the header does not
fit the file, at load time when a read comes back short.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tierserve.experts.books import ExpertTierError
from tierserve.experts.cache import ExpertKey
from tierserve.model.loader import ROUTED_EXPERT

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
Q4_GROUP = 32  # input columns per Q4 scale


@dataclass(slots=True)
class ExpertWeights:
    """One expert in the model dtype: gate and up stacked, and down."""

    gate_up: torch.Tensor  # (2 * expert_ffn, hidden)
    down: torch.Tensor  # (hidden, expert_ffn)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class ExpertSource:
    """A lower tier: ``read(key)`` returns the expert's weights in the model dtype."""

    tier = "host"

    def read(self, key: ExpertKey) -> ExpertWeights:
        raise NotImplementedError

    def read_into(self, key: ExpertKey, gate_up: torch.Tensor, down: torch.Tensor) -> int:
        """Write the expert into ``gate_up`` and ``down`` (a fast slot); bytes moved."""
        weights = self.read(key)
        gate_up.copy_(weights.gate_up)
        down.copy_(weights.down)
        return weights.nbytes

    def drop_page_cache(self) -> None:
        """Forget cached file pages (disk tier only)."""

    def close(self) -> None:
        pass


class HostExperts(ExpertSource):
    """Every expert in host memory: ``float`` (the model dtype, copied on load), ``q8`` (int8
    with one scale per output row) or ``q4`` (4 bits, one scale per 32 inputs, two per byte),
    dequantized to the model dtype on load."""

    tier = "host"

    def __init__(self, experts: dict[ExpertKey, ExpertWeights], fmt: str = "float") -> None:
        if fmt not in ("float", "q8", "q4"):
            raise ValueError(f"expert host format must be float, q8 or q4, got {fmt!r}")
        self.fmt = fmt
        self.dtype = next(iter(experts.values())).gate_up.dtype if experts else torch.float32
        self._store = {key: (w if fmt == "float" else
                             (quantize(w.gate_up, fmt), quantize(w.down, fmt)))
                       for key, w in experts.items()}

    def read(self, key: ExpertKey) -> ExpertWeights:
        stored = self._store[key]
        if self.fmt == "float":
            return stored
        return ExpertWeights(dequantize(stored[0], self.dtype), dequantize(stored[1], self.dtype))


class VictimBuffer:
    """Host memory for experts evicted from the fast slots, in the model dtype, in front of a
    slower tier (the disk, or a quantized host tier): a later miss copies the expert back
    instead of reading the file or dequantizing again. LSM-GNN's victim buffer, as the KV
    tiers keep one (``save_evicted_to_host``), with LSM-GNN's hybrid rule for what stays: when
    the buffer is full, an evicted expert replaces the least used one (loads asked for, counted
    here) only if it was asked for more often; otherwise it is not kept. The MoE layers are
    swept in a cycle larger than the cache, where recency keeps exactly the wrong experts: an
    LRU buffer of 120 behind 120 fast slots (of 480) hit 10% of the misses on the MoEfied
    SmolLM2 (docs/benchmarks.md). Exclusive: an expert copied back leaves the buffer. Only the
    copy worker touches it, one op after another."""

    def __init__(self, num_slots: int, sample: ExpertWeights, pin_memory: bool = False) -> None:
        self.num_slots = num_slots
        self.gate_up = torch.empty((num_slots, *sample.gate_up.shape), dtype=sample.gate_up.dtype,
                                   pin_memory=pin_memory)
        self.down = torch.empty((num_slots, *sample.down.shape), dtype=sample.down.dtype,
                                pin_memory=pin_memory)
        self.scratch_gate_up = torch.empty(sample.gate_up.shape, dtype=sample.gate_up.dtype,
                                           pin_memory=pin_memory)
        self.scratch_down = torch.empty(sample.down.shape, dtype=sample.down.dtype,
                                        pin_memory=pin_memory)
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * num_slots
        self._empty = list(range(num_slots - 1, -1, -1))
        self.uses: Counter[ExpertKey] = Counter()  # loads asked for, per expert
        self.hits = self.misses = self.saved = self.passed_over = 0

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    @property
    def hit_ratio(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def exchange(self, evicted: ExpertKey | None, key: ExpertKey, gate_up: torch.Tensor,
                 down: torch.Tensor) -> int:
        """A fast slot (``gate_up``, ``down``) passes from ``evicted`` to ``key``: keep the
        weights it holds if they earn a place, and fill it from here if ``key`` is here; bytes
        copied in (0: not here, read it from the slower tier). ``key`` goes out through a
        scratch expert first, so its buffer slot is free for ``evicted``."""
        self.uses[key] += 1
        slot = self._slot_of.pop(key, None)
        if slot is None:
            self.misses += 1
        else:
            self.hits += 1
            self.scratch_gate_up.copy_(self.gate_up[slot])
            self.scratch_down.copy_(self.down[slot])
            self._key_of[slot] = None
            self._empty.append(slot)
        if evicted is not None:
            self._save(evicted, gate_up, down)
        if slot is None:
            return 0
        gate_up.copy_(self.scratch_gate_up)
        down.copy_(self.scratch_down)
        return self.scratch_gate_up.nbytes + self.scratch_down.nbytes

    def _save(self, key: ExpertKey, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        if key in self._slot_of:
            return
        if self._empty:
            slot = self._empty.pop()
        else:
            slot = min(self._slot_of.values(), key=lambda s: self.uses[self._key_of[s]])
            if self.uses[self._key_of[slot]] >= self.uses[key]:
                self.passed_over += 1
                return
            del self._slot_of[self._key_of[slot]]
            self._key_of[slot] = None
        self.gate_up[slot].copy_(gate_up)
        self.down[slot].copy_(down)
        self._slot_of[key], self._key_of[slot] = slot, key
        self.saved += 1

    def check_invariants(self) -> None:
        held = [slot for slot, key in enumerate(self._key_of) if key is not None]
        if sorted(self._slot_of.values()) != held or len(held) + len(self._empty) != self.num_slots:
            raise AssertionError("victim buffer books disagree")
        if any(self._slot_of[self._key_of[slot]] != slot for slot in held):
            raise AssertionError("victim buffer maps disagree")


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> (codes, scales); symmetric absmax, ``q8`` per row, ``q4`` per group."""
    w = weight.float()
    if fmt == "q8":
        scales = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        return torch.round(w / scales).clamp(-127, 127).to(torch.int8), scales
    rows, cols = w.shape
    if cols % Q4_GROUP or cols % 2:
        raise ValueError(f"q4 needs the input width to be a multiple of {Q4_GROUP}, got {cols}")
    groups = w.reshape(rows, cols // Q4_GROUP, Q4_GROUP)
    scales = groups.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 7.0
    codes = (torch.round(groups / scales).clamp(-8, 7) + 8).to(torch.uint8).reshape(rows, cols)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales


def dequantize(stored: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    codes, scales = stored
    if codes.dtype == torch.int8:
        return (codes.float() * scales).to(dtype)
    rows = codes.shape[0]
    values = torch.stack([codes & 0x0F, codes >> 4], dim=2).reshape(rows, -1).float() - 8.0
    groups = values.reshape(rows, -1, Q4_GROUP) * scales
    return groups.reshape(rows, -1).to(dtype)


@dataclass(slots=True)
class _Extent:
    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype  # of the stored values; float32 for a quantized GGUF slice
    shape: tuple[int, ...]
    qtype: object = None  # a GGUF quantization type (gguf.GGMLQuantizationType) to dequantize


GGUF_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


class DiskExperts(ExpertSource):
    """Experts read straight from the checkpoint's files (``pread`` of each projection's
    bytes), nothing of them kept in memory. ``extents``: (layer, expert) -> gate/up/down."""

    tier = "disk"

    def __init__(self, extents: dict[ExpertKey, dict[str, _Extent]], dtype: torch.dtype,
                 where: Path) -> None:
        self.dtype = dtype
        self._extents = extents
        for key, parts in extents.items():
            if set(parts) != {"gate", "up", "down"}:
                raise ExpertTierError(f"expert {key} of {where} lacks "
                                      f"{sorted({'gate', 'up', 'down'} - set(parts))} projections")
        self._files = {e.path for parts in extents.values() for e in parts.values()}

    def check_shapes(self, expert_ffn: int, hidden: int, keys: list[ExpertKey]) -> None:
        """Every expert the model routes to is here with the shapes its config implies (the
        loader skipped these tensors, so this is their only check)."""
        want = {"gate": (expert_ffn, hidden), "up": (expert_ffn, hidden),
                "down": (hidden, expert_ffn)}
        for key in keys:
            parts = self._extents.get(key)
            if parts is None:
                raise ExpertTierError(f"expert {key} is in none of the checkpoint's files "
                                      f"({', '.join(sorted(map(str, self._files)))})")
            for name, extent in parts.items():
                if tuple(extent.shape) != want[name]:
                    raise ExpertTierError(
                        f"{extent.path}: expert {key}'s {name} projection has shape "
                        f"{tuple(extent.shape)}, the config implies {want[name]}")

    @classmethod
    def from_safetensors(cls, files: list[Path], renames: list[tuple[re.Pattern, str]],
                         dtype: torch.dtype) -> DiskExperts:
        extents: dict[ExpertKey, dict[str, _Extent]] = {}
        for path in files:
            for name, extent in _header(path).items():
                for pattern, target in renames:
                    name = pattern.sub(target, name)
                match = ROUTED_EXPERT.match(name)
                if match:
                    key = (int(match.group(1)), int(match.group(2)))
                    extents.setdefault(key, {})[match.group(3)] = extent
        return cls(extents, dtype, files[0].parent)

    @classmethod
    def from_gguf(cls, path: Path, dtype: torch.dtype) -> DiskExperts:
        """Each expert's slice of the stacked ``blk.N.ffn_*_exps`` tensors: experts are their
        outermost dimension, so a slice is one contiguous run of (maybe quantized) bytes."""
        from gguf import GGMLQuantizationType as Q

        from tierserve.model.gguf_file import GGUFFormatError, read_gguf

        try:
            gguf_file = read_gguf(path)
        except (GGUFFormatError, OSError) as exc:
            raise ExpertTierError(str(exc)) from exc
        plain = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
        extents: dict[ExpertKey, dict[str, _Extent]] = {}
        for name, info in gguf_file.tensors.items():
            match = GGUF_EXPERTS.match(name)
            if not match:
                continue
            count, shape = info.shape[0], tuple(info.shape[1:])
            each = info.n_bytes // count
            stored = plain.get(info.qtype)
            for expert in range(count):
                extents.setdefault((int(match.group(1)), expert), {})[match.group(2)] = _Extent(
                    path, info.offset + expert * each, each, stored or torch.float32, shape,
                    None if stored else info.qtype)
        return cls(extents, dtype, path)

    def read(self, key: ExpertKey) -> ExpertWeights:
        parts = self._extents.get(key)
        if parts is None:
            raise ExpertTierError(f"expert {key} is in none of the checkpoint's files")
        gate, up, down = (self._read(parts[name]) for name in ("gate", "up", "down"))
        return ExpertWeights(torch.cat([gate, up]), down)

    def read_into(self, key: ExpertKey, gate_up: torch.Tensor, down: torch.Tensor) -> int:
        """Straight from the file into a CPU slot of the file's dtype (``preadv`` into the
        slot's memory: one copy); otherwise through ``read``."""
        parts = self._extents.get(key)
        if parts is None or gate_up.device.type != "cpu" or any(
                e.dtype != gate_up.dtype or e.qtype is not None for e in parts.values()):
            return super().read_into(key, gate_up, down)
        rows = parts["gate"].shape[0]
        targets = [(parts["gate"], gate_up[:rows]), (parts["up"], gate_up[rows:]),
                   (parts["down"], down)]
        for extent, target in targets:
            self._read_exact(extent, _bytes_of(target))
        return sum(extent.nbytes for extent, _ in targets)

    def _read_exact(self, extent: _Extent, into: memoryview) -> None:
        # Opened per read (cheap beside the read): a file replaced or removed while serving is
        # seen as such, and named, instead of read through a stale descriptor.
        if len(into) != extent.nbytes:
            raise ExpertTierError(f"{extent.path}: a tensor of {extent.nbytes:,} bytes does not "
                                  f"fit its slot of {len(into):,}")
        try:
            fd = os.open(extent.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [into], extent.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ExpertTierError(f"reading expert weights from {extent.path} failed: {exc}") from exc
        if got != extent.nbytes:
            raise ExpertTierError(
                f"{extent.path} is truncated: expected {extent.nbytes:,} bytes at offset "
                f"{extent.offset:,}, read {got:,}; re-create or re-copy the checkpoint")

    def _read(self, extent: _Extent) -> torch.Tensor:
        if extent.qtype is None:
            tensor = torch.empty(extent.shape, dtype=extent.dtype)
            self._read_exact(extent, _bytes_of(tensor))
            return tensor.to(self.dtype)
        from tierserve.model.gguf_file import dequantize_float32

        raw = np.empty(extent.nbytes, dtype=np.uint8)
        self._read_exact(extent, memoryview(raw).cast("B"))
        return torch.from_numpy(dequantize_float32(raw, extent.shape, extent.qtype)).to(self.dtype)

    def drop_page_cache(self) -> None:
        for path in sorted(self._files):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes (numpy has no bfloat16: seen as int16)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def _header(path: Path) -> dict[str, _Extent]:
    """A safetensors file's tensors as extents; a missing or short file is an ExpertTierError."""
    if not path.is_file():
        raise ExpertTierError(f"expert weights file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ExpertTierError(f"{path} is truncated: {size} bytes, not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ExpertTierError(f"{path} is truncated: its header says {length:,} bytes, "
                                  f"the file has {size:,}")
        header = json.loads(file.read(length))
    base = 8 + length
    extents = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _ST_DTYPES:
            continue
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ExpertTierError(
                f"{path} is truncated: tensor {name} ends at byte {base + end:,}, the file has "
                f"{size:,}; re-create or re-copy the checkpoint")
        extents[name] = _Extent(path, base + begin, end - begin, _ST_DTYPES[info["dtype"]],
                                tuple(info["shape"]))
    return extents
