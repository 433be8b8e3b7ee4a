"""Accelerator profiles as data: peak dense bf16 FLOPS, HBM capacity and bandwidth, host link
and NVLink bandwidth, each with the datasheet it comes from.

Bandwidths are per direction in bytes/s (PCIe 4.0 x16: 32 GB/s each way, so a swap-out and a
swap-in can run at once). What a real copy achieves is a fraction of the peak; the cost models
apply those fractions (``LinkSpec.efficiency``), not these constants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TB = 1e12


@dataclass(slots=True, frozen=True)
class LinkSpec:
    """A copy link: per-copy overhead plus bytes over ``bandwidth * efficiency``."""

    bandwidth: float  # bytes/s, one direction
    overhead_s: float = 10e-6  # launch + driver cost of one copy (one contiguous run)
    efficiency: float = 0.8  # achieved fraction of the peak on large copies

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or not 0 < self.efficiency <= 1 or self.overhead_s < 0:
            raise ValueError(f"a link needs bandwidth > 0, efficiency in (0, 1] and "
                             f"overhead >= 0, got {self}")

    def seconds(self, num_copies: int, num_bytes: int) -> float:
        """Time of ``num_copies`` copies moving ``num_bytes`` in all, one after another."""
        return num_copies * self.overhead_s + num_bytes / (self.bandwidth * self.efficiency)


@dataclass(slots=True, frozen=True)
class HardwareProfile:
    """One accelerator (and its host link)."""

    name: str
    bf16_flops: float  # dense (no sparsity) peak, FLOP/s
    memory_bytes: float  # HBM capacity
    memory_bandwidth: float  # HBM bytes/s
    host_link: LinkSpec  # device <-> host memory (PCIe)
    interconnect_bandwidth: float  # device <-> device (NVLink, or PCIe when there is none), per direction
    interconnect: str  # "nvlink" | "pcie" | "ethernet"
    source: str
    interconnect_latency_s: float = 5e-6  # one collective's fixed cost (launch + sync)

    def __post_init__(self) -> None:
        for name in ("bf16_flops", "memory_bytes", "memory_bandwidth", "interconnect_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hardware {self.name}: {name} must be positive")


def _pcie(generation: int) -> LinkSpec:
    # x16, per direction: gen 4 = 16 GT/s x 16 lanes x 128/130 ~ 31.5 GB/s, gen 5 twice that.
    return LinkSpec(bandwidth={4: 31.5 * GB, 5: 63.0 * GB}[generation])


HARDWARE: dict[str, HardwareProfile] = {profile.name: profile for profile in (
    HardwareProfile(
        "a100-80gb-sxm", bf16_flops=312e12, memory_bytes=80 * GB, memory_bandwidth=2039 * GB,
        host_link=_pcie(4), interconnect_bandwidth=300 * GB, interconnect="nvlink",
        source="NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense, HBM2e "
               "2,039 GB/s, NVLink 600 GB/s (both directions), PCIe Gen4 64 GB/s (both)"),
    HardwareProfile(
        "a100-80gb-pcie", bf16_flops=312e12, memory_bytes=80 * GB, memory_bandwidth=1935 * GB,
        host_link=_pcie(4), interconnect_bandwidth=300 * GB, interconnect="nvlink",
        source="NVIDIA A100 datasheet (2021): BF16 312 TFLOPS dense, HBM2e 1,935 GB/s, NVLink "
               "bridge 600 GB/s for 2 GPUs, PCIe Gen4 64 GB/s"),
    HardwareProfile(
        "h100-sxm", bf16_flops=989e12, memory_bytes=80 * GB, memory_bandwidth=3350 * GB,
        host_link=_pcie(5), interconnect_bandwidth=450 * GB, interconnect="nvlink",
        source="NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 1,979 TFLOPS with sparsity "
               "(989 dense), HBM3 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s"),
    HardwareProfile(
        "h200", bf16_flops=989e12, memory_bytes=141 * GB, memory_bandwidth=4800 * GB,
        host_link=_pcie(5), interconnect_bandwidth=450 * GB, interconnect="nvlink",
        source="NVIDIA H200 Tensor Core GPU datasheet (2024), SXM: BF16 1,979 TFLOPS with "
               "sparsity (989 dense), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 "
               "128 GB/s"),
    HardwareProfile(
        "a10", bf16_flops=125e12, memory_bytes=24 * GB, memory_bandwidth=600 * GB,
        host_link=_pcie(4), interconnect_bandwidth=31.5 * GB, interconnect="pcie",
        source="NVIDIA A10 Tensor Core GPU datasheet (2021): BF16 125 TFLOPS dense (250 with "
               "sparsity), 24 GB GDDR6 at 600 GB/s, PCIe Gen4 64 GB/s, no NVLink"),
    HardwareProfile(
        "l4", bf16_flops=121e12, memory_bytes=24 * GB, memory_bandwidth=300 * GB,
        host_link=_pcie(4), interconnect_bandwidth=31.5 * GB, interconnect="pcie",
        source="NVIDIA L4 Tensor Core GPU datasheet (2023): BF16 242 TFLOPS with sparsity "
               "(121 dense), 24 GB GDDR6 at 300 GB/s, PCIe Gen4 x16 64 GB/s, no NVLink"),
)}

@dataclass(slots=True, frozen=True)
class HostCPU:
    """The host's CPU, for work the engine runs there instead of on the device (Fiddler's cold
    experts): a roofline over ``flops`` and ``memory_bandwidth``, each at an achieved fraction."""

    name: str
    flops: float  # peak FLOP/s at the math bf16 weights run in (FP32 FMA on CPUs without BF16)
    memory_bandwidth: float  # bytes/s, all channels
    source: str
    flops_efficiency: float = 0.4  # bf16 weights widened to FP32 before the FMAs
    bandwidth_efficiency: float = 0.7  # STREAM-like reads reach about this share of the peak

    def seconds(self, weight_bytes: float, flops: float) -> float:
        """A GEMM reading ``weight_bytes`` of weights and doing ``flops``."""
        return max(weight_bytes / (self.memory_bandwidth * self.bandwidth_efficiency),
                   flops / (self.flops * self.flops_efficiency))


# One socket of the kind of host an A100 PCIe server has.
EPYC_7763 = HostCPU(
    "epyc-7763", flops=64 * 2.45e9 * 32, memory_bandwidth=8 * 25.6 * GB,
    source="AMD EPYC 7763 product page: 64 Zen 3 cores at 2.45 GHz base, 8 channels of "
           "DDR4-3200 (25.6 GB/s each); Zen 3 issues two 256-bit FMAs a cycle (32 FP32 FLOP)")

# Tensor-parallel traffic between machines (no NVLink across hosts): 100 Gb/s Ethernet.
ETHERNET_100G = 12.5 * GB


def get_hardware(name: str, interconnect: str | None = None) -> HardwareProfile:
    """The named profile; ``interconnect="ethernet"`` replaces its device link by 100 GbE."""
    try:
        profile = HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}"
                         ) from None
    if interconnect in (None, profile.interconnect):
        return profile
    if interconnect == "ethernet":
        return replace(profile, interconnect="ethernet", interconnect_bandwidth=ETHERNET_100G,
                       interconnect_latency_s=20e-6)
    if interconnect == "pcie":
        return replace(profile, interconnect="pcie",
                       interconnect_bandwidth=profile.host_link.bandwidth)
    raise ValueError(f"interconnect must be nvlink, pcie or ethernet, got {interconnect!r}")
