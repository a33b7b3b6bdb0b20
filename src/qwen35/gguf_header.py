"""A GGUF file's header read in one pass: its key/values and tensor table, as the `gguf`
package's GGUFReader gives them (the fields' `contents()`, the tensors' name, type, shape, bytes,
offset and a memory-mapped view of their data), ~20x faster where the header holds a 248K-token
vocabulary: the package's reader builds a numpy view per string (5-6 s for a Qwen 3.5 file on the
Zen 5 VM), this reads each with struct (0.3 s). Little-endian files of GGUF versions 2 and 3;
anything else (a big-endian file, nested arrays) raises Unsupported and the caller takes the
package's reader (gguf_checkpoint._reader). tests/test_gguf.py checks both readers agree on every
file the tests write, and on llama.cpp's own where it is at hand.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType): struct formats of the scalar ones
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9
# ggml types whose data the package's reader types (the others: each row's bytes)
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip


class Unsupported(Exception):
    """A valid GGUF file this reader leaves to the package's (big-endian, nested arrays)."""


@dataclass
class Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    """A tensor as the package's ReaderTensor has it (the attributes qwen35 reads): shape in
    ggml order (fastest first), data a memory-mapped numpy view."""

    name: str
    tensor_type: Any
    shape: np.ndarray
    data: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int = 0


def tensor_view(mm: np.ndarray, kind: str, ne: list[int], offset: int, nbytes: int) -> np.ndarray:
    """A tensor's data in the file `mm` (a uint8 memmap) as the package's reader shapes it:
    typed values [..rows, ne[0]] for F32 / F16 / integer types, else each row's bytes."""
    raw = mm[offset : offset + nbytes]
    rows = tuple(reversed(ne[1:]))
    if kind in _TYPED:
        return raw.view(_TYPED[kind]).reshape(rows + (ne[0],))
    n = int(np.prod(ne))
    return raw.reshape(rows + (nbytes // max(1, n // ne[0]),))


class HeaderReader:
    """`.fields` {key: Field} (with the package's GGUF.version / tensor_count / kv_count) and
    `.tensors` [Tensor] of one file."""

    def __init__(self, path: str):
        import gguf

        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:  # (buf: struct reads the header; the tensors' data views: a numpy memmap)
            self._parse(buf, np.memmap(path, mode="r", dtype=np.uint8), gguf)
        finally:
            buf.close()

    def _parse(self, buf, mm: np.ndarray, gguf) -> None:
        if buf[:4] != MAGIC:
            raise ValueError("GGUF magic invalid")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise Unsupported(f"version {version}")  # (a big-endian file reads as 2 << 24...)
        self.fields = {"GGUF.version": Field(version), "GGUF.tensor_count": Field(n_tensors),
                       "GGUF.kv_count": Field(n_kv)}  # fmt: skip
        off = 24
        for _ in range(n_kv):
            key, off = _string(buf, off)
            (kind,), off = struct.unpack_from("<I", buf, off), off + 4
            self.fields[key], off = _value(buf, off, kind)
        infos, names = [], set()
        for _ in range(n_tensors):
            name, off = _string(buf, off)
            if name in names:
                raise ValueError(f"Found duplicated tensor with name {name}")
            names.add(name)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, off + 4))
            kind, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, dims, kind, rel))
        align = self.fields.get("general.alignment")
        align = 32 if align is None else align.value
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError("Invalid alignment: must be a non-zero power of two")
        start = off + (-off % align)
        self.tensors = []
        for name, dims, kind, rel in infos:
            qt = gguf.GGMLQuantizationType(kind)
            block, size = gguf.GGML_QUANT_SIZES[qt]
            n = int(np.prod(dims))
            nbytes = n * size // block
            if start + rel + nbytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            data = tensor_view(mm, qt.name, dims, start + rel, nbytes)
            self.tensors.append(Tensor(name, qt, np.array(dims, dtype=np.uint64), data, n,
                                       nbytes, start + rel))  # fmt: skip


def _string(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    end = off + 8 + n
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return str(buf[off + 8 : end], encoding="utf-8"), end


def _value(buf, off: int, kind: int) -> tuple[Field, int]:
    if kind == _STRING:
        s, off = _string(buf, off)
        return Field(s), off
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return Field(struct.unpack_from(fmt, buf, off)[0]), off + struct.calcsize(fmt)
    if kind != _ARRAY:
        raise ValueError(f"unknown value type {kind}")
    sub, n = struct.unpack_from("<IQ", buf, off)
    off += 12
    if sub == _STRING:
        out = []
        for _ in range(n):
            s, off = _string(buf, off)
            out.append(s)
        return Field(out), off
    if sub not in _NUMPY:
        raise Unsupported(f"an array of value type {sub}")
    dtype = np.dtype(_NUMPY[sub]).newbyteorder("<")
    arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off)
    return Field(arr.tolist()), off + n * dtype.itemsize
