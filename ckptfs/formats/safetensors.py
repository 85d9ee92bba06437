"""Find the tensors of a safetensors file from its JSON header. Pure; callable from any thread."""

from __future__ import annotations

import json
import os
import struct

from ckptfs.formats.layout import Record

_WIDTHS = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


def safetensors_records(fd: int, file_size: int) -> list[Record] | None:
    """Return one record per tensor (absolute offsets), or ``None`` if this is not a safetensors file."""
    if file_size < 10:
        return None
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        return None
    (hlen,) = struct.unpack("<Q", head)
    if hlen < 2 or hlen > _MAX_HEADER or 8 + hlen > file_size:
        return None
    raw = os.pread(fd, hlen, 8)
    if len(raw) != hlen or not raw.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    base = 8 + hlen
    records = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            width = _WIDTHS.get(info.get("dtype", ""), 0)
        except (TypeError, KeyError, ValueError):
            return None
        if not (isinstance(begin, int) and isinstance(end, int)) or not 0 <= begin <= end:
            return None
        if base + end > file_size:
            return None
        records.append(Record(str(name), base + begin, end - begin, width))
    return records
