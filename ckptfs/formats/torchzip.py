"""Find the tensor records of a torch.save (zip, torch >= 1.6) file from its zip directory.

torch.save writes an uncompressed ("stored") zip: ``<stem>/data.pkl``, ``<stem>/.format_version``,
``<stem>/.storage_alignment``, ``<stem>/byteorder``, then one ``<stem>/data/N`` record per storage,
64-byte aligned, and zip64 structures for large archives. Only the directory, the local headers and
``data.pkl`` (for each storage's element width) are read, never the tensor payload. Pure; callable
from any thread.
"""

from __future__ import annotations

import os
import struct

from ckptfs.formats.layout import Record
from ckptfs.formats.torchpickle import MAX_PICKLE, storage_widths

_EOCD = b"PK\x05\x06"
_EOCD64_LOC = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CDH = b"PK\x01\x02"
_LFH = b"PK\x03\x04"
_MAX_COMMENT = 65535


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError("short read inside zip structure")
    return data


def _directory(fd: int, file_size: int) -> tuple[int, int, int]:
    """Return (central directory offset, size, entry count)."""
    tail_len = min(file_size, 22 + _MAX_COMMENT + 20)
    tail = _pread(fd, tail_len, file_size - tail_len)
    pos = tail.rfind(_EOCD)
    if pos < 0 or len(tail) - pos < 22:
        raise ValueError("no end-of-central-directory record")
    _, _, _, _, count, cd_size, cd_off, _ = struct.unpack_from("<4sHHHHIIH", tail, pos)
    loc = pos - 20
    if loc >= 0 and tail[loc : loc + 4] == _EOCD64_LOC:
        (eocd64_off,) = struct.unpack_from("<Q", tail, loc + 8)
        rec = _pread(fd, 56, eocd64_off)
        if rec[:4] != _EOCD64:
            raise ValueError("bad zip64 end-of-central-directory record")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", rec, 32)
    return cd_off, cd_size, count


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if tag == 0x0001:
            vals = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if offset == 0xFFFFFFFF and vals:
                offset = vals.pop(0)
        pos += 4 + size
    return usize, csize, offset


def torchzip_records(fd: int, file_size: int) -> list[Record] | None:
    """Return the ``data/N`` records (name without the archive folder, element width from the pickle when
    it says) or ``None`` if not a torch zip.

    ``None`` also for zips that torch did not write as stored records (anything compressed).
    """
    try:
        if file_size < 22 or _pread(fd, 4, 0) != _LFH:
            return None
        cd_off, cd_size, count = _directory(fd, file_size)
        if cd_off + cd_size > file_size or count > 10_000_000:
            return None
        cd = _pread(fd, cd_size, cd_off)
        records: list[Record] = []
        pickle_at: tuple[int, int] | None = None
        saw_pickle = False
        pos = 0
        for _ in range(count):
            if cd[pos : pos + 4] != _CDH:
                return None
            (method, csize, usize, nlen, xlen, clen, off) = struct.unpack_from("<10xH8xIIHHH8xI", cd, pos)
            name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
            extra = cd[pos + 46 + nlen : pos + 46 + nlen + xlen]
            pos += 46 + nlen + xlen + clen
            usize, csize, off = _zip64_extra(extra, usize, csize, off)
            inner = name.split("/", 1)[1] if "/" in name else name
            if inner == "data.pkl":
                saw_pickle = True
                start = _payload_start(fd, off)
                if method == 0 and csize == usize and 0 <= start and start + usize <= file_size:
                    pickle_at = (start, usize)
            if not inner.startswith("data/"):
                continue
            if method != 0 or csize != usize:
                return None
            start = _payload_start(fd, off)
            if start < 0 or start + usize > file_size:
                return None
            records.append(Record(inner, start, usize))
        if not saw_pickle:
            return None
        if pickle_at is not None and pickle_at[1] <= MAX_PICKLE:
            widths = storage_widths(_pread(fd, pickle_at[1], pickle_at[0]))
            records = [Record(r.name, r.offset, r.length, widths.get(r.name[len("data/") :], 0)) for r in records]
    except (ValueError, struct.error):
        return None
    return records


def _payload_start(fd: int, header_offset: int) -> int:
    """Where the bytes of the zip entry whose local header is at ``header_offset`` begin (-1: no header)."""
    lfh = _pread(fd, 30, header_offset)
    if lfh[:4] != _LFH:
        return -1
    lnlen, lxlen = struct.unpack_from("<HH", lfh, 26)
    return header_offset + 30 + int(lnlen) + int(lxlen)
