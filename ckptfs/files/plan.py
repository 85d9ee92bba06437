"""Choose how a file is cut into pieces: torch.save zip, safetensors, or content-defined chunks.

Pure; runs in a worker thread with the file's own fd.
"""

from __future__ import annotations

from ckptfs.chunker import cdc_pieces
from ckptfs.formats import Record, cut, plan_records, safetensors_records, signature, torchzip_records
from ckptfs.types import Piece


def plan_file(
    fd: int, size: int, piece_size: int, cdc_avg: int, positional: str | None = None
) -> tuple[str, str | None, list[Piece]]:
    """Return (layout name, layout signature or None, pieces covering ``[0, size)``).

    A file ckptfs cannot parse gets content-defined chunks, unless ``positional`` names a key (its file
    name and size: a same-named, same-sized file exists, like ``step_100/__0_0.distcp`` for
    ``step_200/__0_0.distcp``): then fixed pieces at fixed offsets, so delta coding lines up.
    """
    for name, finder in (("torchzip", torchzip_records), ("safetensors", safetensors_records)):
        records = finder(fd, size)
        if records:
            try:
                return name, signature(name, records), plan_records(records, size, piece_size)
            except ValueError:
                break
    if positional is not None:
        return "positional", signature("positional", [Record(positional, 0, size)]), cut(0, size, piece_size, "pos")
    return "cdc", None, cdc_pieces(fd, size, cdc_avg)
