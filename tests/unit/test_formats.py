"""Layouts of real torch.save and safetensors files; FastCDC boundaries."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from ckptfs.chunker import cdc_pieces
from ckptfs.files.plan import plan_file
from ckptfs.formats import plan_records, safetensors_records, torchzip_records
from ckptfs.formats.layout import MIN_RECORD, Record
from ckptfs.formats.torchpickle import storage_widths
from tests.helpers import make_state


def _open(path):
    fd = os.open(path, os.O_RDONLY)
    return fd, os.fstat(fd).st_size


def _covers(pieces, size):
    pos = 0
    for p in pieces:
        assert p.offset == pos and p.length > 0
        pos += p.length
    assert pos == size


def test_torch_zip_records_are_stored_aligned_and_match_tensors(tmp_path):
    state = make_state(width=300)
    path = tmp_path / "step_000100.pt"
    torch.save(state, path)
    fd, size = _open(path)
    try:
        records = torchzip_records(fd, size)
        assert records is not None
        tensors = [t for t in list(state["model"].values()) if isinstance(t, torch.Tensor)]
        assert len(records) >= len(tensors)
        blob = path.read_bytes()
        for rec in records:
            assert rec.name.startswith("data/")  # archive folder stripped
            assert rec.offset % 64 == 0  # torch aligns storages to 64 bytes
        payloads = {blob[r.offset : r.offset + r.length] for r in records}
        for t in tensors:
            assert t.numpy().tobytes() in payloads
    finally:
        os.close(fd)


def test_slots_match_between_checkpoints_although_offsets_move(tmp_path):
    a, b = tmp_path / "step_000100.pt", tmp_path / "step_000200_longer_name.pt"
    state = make_state(width=512)
    torch.save(state, a)
    state["step"] = 10**12  # the pickle grows
    torch.save(state, b)
    plans, sigs = [], []
    for p in (a, b):
        fd, size = _open(p)
        try:
            layout, sig, pieces = plan_file(fd, size, 1 << 20, 1 << 20)
        finally:
            os.close(fd)
        assert layout == "torchzip"
        sigs.append(sig)
        _covers(pieces, size)
        plans.append({pc.slot: p.read_bytes()[pc.offset : pc.offset + pc.length] for pc in pieces})
    assert plans[0].keys() == plans[1].keys()
    assert sigs[0] == sigs[1]  # same layout: the second finds the first's chunks as delta bases
    big = [s for s in plans[0] if not s.startswith("~")]
    assert big and all(plans[0][s] == plans[1][s] for s in big)


def test_torch_zip_record_widths_come_from_the_pickle(tmp_path):
    dtypes = [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ]
    state = {"nested": [{str(d): torch.zeros(1000, dtype=d)} for d in dtypes], "step": 7, "name": "run7"}
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    fd, size = _open(path)
    try:
        records = torchzip_records(fd, size)
    finally:
        os.close(fd)
    assert records is not None
    expected = {1: 1, 2: 2, 4: 4, 8: 8}
    got = sorted(r.width for r in records)
    want = sorted(4 if d == torch.complex64 else expected[torch.empty(0, dtype=d).element_size()] for d in dtypes)
    assert got == want


def test_the_pickle_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    data = pickle.dumps({"x": Evil(), "y": [1, 2, 3]})
    assert storage_widths(data) == {}
    assert not marker.exists()
    assert storage_widths(b"not a pickle") == {}
    assert storage_widths(pickle.dumps(list(range(10)))[:-3]) == {}  # truncated


def test_not_a_torch_zip(tmp_path):
    p = tmp_path / "x.zip"
    import zipfile

    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/data.pkl", b"x" * 1000)
        z.writestr("a/data/0", b"y" * 1000)
    fd, size = _open(p)
    try:
        assert torchzip_records(fd, size) is None  # compressed records: not ours to slice
    finally:
        os.close(fd)
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    fd, size = _open(p)
    try:
        assert torchzip_records(fd, size) is None
    finally:
        os.close(fd)


def test_safetensors_records(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(512, 512), "b": torch.randn(512).to(torch.bfloat16)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    fd, size = _open(path)
    try:
        recs = {r.name: r for r in safetensors_records(fd, size)}
    finally:
        os.close(fd)
    blob = path.read_bytes()
    assert recs["w"].width == 4 and recs["b"].width == 2
    for name, t in tensors.items():
        r = recs[name]
        assert blob[r.offset : r.offset + r.length] == t.view(torch.uint8).numpy().tobytes()


def test_plan_records_cuts_big_records_from_their_start():
    recs = [
        Record("a", 100, MIN_RECORD * 5, 4),
        Record("small", 100 + MIN_RECORD * 5, 10),
        Record("b", 2_000_000, 3_000_000),
    ]
    pieces = plan_records(recs, 6_000_000, 1 << 20)
    _covers(pieces, 6_000_000)
    a_pieces = [p for p in pieces if p.slot and p.slot.startswith("a#")]
    assert a_pieces[0].offset == 100 and all(p.elem_width == 4 for p in a_pieces)
    with pytest.raises(ValueError):
        plan_records([Record("x", 0, 10), Record("y", 5, 10)], 100, 1 << 20)


def test_cdc_boundaries_resist_insertions(tmp_path):
    rng = random.Random(0)
    body = rng.randbytes(8 << 20)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(body)
    b.write_bytes(b"inserted" + body)
    cuts = []
    for p in (a, b):
        fd, size = _open(p)
        try:
            pieces = cdc_pieces(fd, size, 256 * 1024)
        finally:
            os.close(fd)
        _covers(pieces, size)
        data = p.read_bytes()
        cuts.append({data[x.offset : x.offset + x.length] for x in pieces})
    shared = len(cuts[0] & cuts[1])
    assert shared >= len(cuts[0]) - 2  # only the chunk with the insertion differs


def test_cdc_small_and_empty(tmp_path):
    p = tmp_path / "s"
    p.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    fd, size = _open(p)
    try:
        assert [(x.offset, x.length) for x in cdc_pieces(fd, size, 65536)] == [(0, 100)]
        assert cdc_pieces(fd, 0, 65536) == []
    finally:
        os.close(fd)


def test_cdc_streams_the_file_and_a_shrinking_one_is_an_error_not_a_crash(tmp_path):
    """Content-defined chunking reads with pread (no mmap: a truncate under a mapping is SIGBUS) and cuts
    exactly where FastCDC over the whole buffer would."""
    from pyfastcdc import FastCDC

    from ckptfs.errors import FileChanged

    data = os.urandom(9 << 20) + bytes(2 << 20) + os.urandom(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        got = [(p.offset, p.length) for p in cdc_pieces(fd, len(data), 1 << 20)]
        ref = [(c.offset, c.length) for c in FastCDC(1 << 20, min_size=1 << 18, max_size=1 << 22).cut_buf(data)]
        assert got == ref
        os.ftruncate(fd, len(data) // 2)  # a writer truncated the staging file meanwhile
        with pytest.raises(FileChanged):
            cdc_pieces(fd, len(data), 1 << 20)
    finally:
        os.close(fd)
