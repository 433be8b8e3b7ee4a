"""Read a GGUF file: its metadata and tensor table in one fast pass, and each tensor dequantized.

``gguf.GGUFReader`` builds a numpy view per array element, which costs ~2 s on a tokenizer's
50k-string vocabulary. This reader walks the header once with ``struct`` over an ``mmap`` (~50 ms
for the same file) and leaves dequantization to ``gguf.quants``. Only little-endian GGUF v2/v3
files are read; llama.cpp writes nothing else by default.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf import GGUFValueType as VT
from gguf.quants import dequantize, quant_shape_to_byte_shape

# struct format per scalar metadata type (little-endian).
_SCALAR_FORMATS: dict[VT, str] = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT32: "<f",
    VT.FLOAT64: "<d",
    VT.BOOL: "<?",
}
_SUPPORTED_VERSIONS = (2, 3)


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[
        int, ...
    ]  # torch order: ggml's dims reversed, so a [576, 1536] ggml tensor is (1536, 576)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(slots=True)
class GGUFFile:
    """A GGUF file's header: metadata key -> value (arrays as lists) and tensors by name, file order."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    def read_float32(self, name: str) -> np.ndarray:
        """Dequantize tensor ``name`` to a writable float32 array in torch order.

        Raises ``NotImplementedError`` when gguf.quants cannot dequantize its type.
        """
        info = self.tensors[name]
        raw = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,)
        )
        raw = raw.view(
            np.ndarray
        )  # a plain array: memmap slices are slow to make, and dequantize makes many
        return dequantize_float32(raw, info.shape, info.qtype)


def dequantize_float32(
    raw: np.ndarray, shape: tuple[int, ...], qtype: GGMLQuantizationType
) -> np.ndarray:
    """A tensor's stored bytes (uint8) as a writable float32 array of ``shape`` (torch order)."""
    values = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype).reshape(shape)
    if not values.flags.writeable or values.dtype != np.float32:
        values = np.array(values, dtype=np.float32)  # F32 comes back as a view of the map
    return values


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at ``path`` (no tensor data is read)."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return _parse(path, _Cursor(view))
        finally:
            view.release()


class _Cursor:
    """A read position in a little-endian buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, vtype: VT) -> Any:
        if vtype == VT.STRING:
            return self.string()
        if vtype == VT.ARRAY:
            item_type, count = VT(self.scalar("<I")), self.scalar("<Q")
            if item_type in _SCALAR_FORMATS:  # one numpy read instead of `count` struct calls
                dtype = np.dtype(_SCALAR_FORMATS[item_type])
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        raise GGUFFormatError(f"unknown GGUF metadata value type {vtype}")


def _parse(path: Path, cur: _Cursor) -> GGUFFile:
    if len(cur.buf) < 24 or cur.scalar("<I") != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{path} is not a GGUF file (bad magic); pass a .gguf file from llama.cpp"
        )
    version = cur.scalar("<I")
    if version not in _SUPPORTED_VERSIONS:
        hint = (
            " (it looks big-endian; convert it on a little-endian machine)"
            if version & 0xFFFF == 0
            else ""
        )
        raise GGUFFormatError(
            f"{path} is GGUF version {version}{hint}; tierserve reads versions 2 and 3"
        )
    tensor_count, kv_count = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(VT(cur.scalar("<I")))
    raw_infos = [_read_tensor_info(cur) for _ in range(tensor_count)]
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    tensors = {}
    for name, shape, qtype, relative_offset in raw_infos:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        offset = data_start + relative_offset
        if offset + n_bytes > len(cur.buf):
            raise GGUFFormatError(
                f"{path} is truncated: tensor {name!r} ends past the end of the file"
            )
        tensors[name] = GGUFTensorInfo(name, shape, qtype, offset, n_bytes)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cur.string()
    n_dims = cur.scalar("<I")
    ggml_dims = [cur.scalar("<Q") for _ in range(n_dims)]
    raw_type = cur.scalar("<I")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFFormatError(
            f"tensor {name!r} has ggml type {raw_type}, unknown to gguf {_gguf_version()}; "
            "upgrade the gguf package (pip install -U gguf)"
        ) from None
    return name, tuple(reversed(ggml_dims)), qtype, cur.scalar("<Q")


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
