"""The vocabulary of KV tier copies shared by the scheduler (pure Python) and the model side.

Block ids are per tier: block 7 of the host tier and block 7 of the device tier are unrelated.
A ``CopyRun`` is a range of neighbouring blocks; because the KV cache is block-major, one run is
one contiguous memory region on either side and so costs one tensor copy. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Tier(str, Enum):
    """Where a KV block lives, fastest first."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(slots=True, frozen=True)
class CopyRun:
    """Copy blocks ``[src_start, src_start + length)`` to ``[dst_start, dst_start + length)``."""

    src_start: int
    dst_start: int
    length: int

    def __post_init__(self) -> None:
        if self.length < 1 or self.src_start < 0 or self.dst_start < 0:
            raise ValueError(f"a copy run needs length >= 1 and block ids >= 0, got {self}")


@dataclass(slots=True, frozen=True)
class SwapOp:
    """Copy ``runs`` of blocks from one tier to another; runs execute in order."""

    src_tier: Tier
    dst_tier: Tier
    runs: tuple[CopyRun, ...]

    def __post_init__(self) -> None:
        # Same-tier copies could overlap (undefined result); no caller needs them.
        if self.src_tier == self.dst_tier:
            raise ValueError(f"a SwapOp moves blocks between two tiers, got {self.src_tier.value} "
                             "to itself")

    @property
    def num_blocks(self) -> int:
        return sum(run.length for run in self.runs)

    def src_blocks(self) -> list[int]:
        return [run.src_start + i for run in self.runs for i in range(run.length)]

    def dst_blocks(self) -> list[int]:
        return [run.dst_start + i for run in self.runs for i in range(run.length)]


def coalesce(src_blocks: list[int], dst_blocks: list[int]) -> list[CopyRun]:
    """Pair ``src_blocks[i] -> dst_blocks[i]`` and merge neighbours into maximal runs.

    Two consecutive pairs join a run only if BOTH the source and the destination id go up by
    one; the order of the pairs is kept (``[3,4,5,9,10,2] -> [0..5]`` gives 3 runs).
    """
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"coalesce needs one destination per source block, got "
                         f"{len(src_blocks)} sources and {len(dst_blocks)} destinations")
    runs: list[CopyRun] = []
    if not src_blocks:
        return runs
    src_start, dst_start, length = src_blocks[0], dst_blocks[0], 1
    for src, dst in zip(src_blocks[1:], dst_blocks[1:]):
        if src == src_start + length and dst == dst_start + length:
            length += 1
            continue
        runs.append(CopyRun(src_start, dst_start, length))
        src_start, dst_start, length = src, dst, 1
    runs.append(CopyRun(src_start, dst_start, length))
    return runs
