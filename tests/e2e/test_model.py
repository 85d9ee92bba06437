"""Random file operations against an in-memory model (hypothesis stateful testing) on a real mount."""

from __future__ import annotations

import os
import shutil

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.conftest import Mount

NAMES = st.sampled_from(["a", "b", "c", "d", "e"])
DATA = st.binary(min_size=0, max_size=3000) | st.builds(lambda n, b: bytes([b]) * n,
                                                        st.integers(0, 300_000), st.integers(0, 255))


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    m = Mount(tmp_path_factory.mktemp("model"))
    m.start()
    yield m
    try:
        m.umount()
    finally:
        m.cleanup()


class FileModel(RuleBasedStateMachine):
    mount: Mount

    def __init__(self):
        super().__init__()
        self.root = self.mount.path("work")
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir()
        self.files: dict[str, bytes] = {}

    @rule(name=NAMES, data=DATA)
    def write_whole(self, name, data):
        (self.root / name).write_bytes(data)
        self.files[name] = data

    @precondition(lambda self: self.files)
    @rule(data=st.data(), chunk=st.binary(min_size=1, max_size=5000), off=st.integers(0, 400_000))
    def write_at(self, data, chunk, off):
        name = data.draw(st.sampled_from(sorted(self.files)))
        with open(self.root / name, "r+b") as f:
            f.seek(off)
            f.write(chunk)
        old = self.files[name]
        if off > len(old):
            old = old + b"\0" * (off - len(old))
        self.files[name] = old[:off] + chunk + old[off + len(chunk):]

    @precondition(lambda self: self.files)
    @rule(data=st.data(), chunk=st.binary(min_size=1, max_size=5000))
    def append(self, data, chunk):
        name = data.draw(st.sampled_from(sorted(self.files)))
        with open(self.root / name, "ab") as f:
            f.write(chunk)
        self.files[name] += chunk

    @precondition(lambda self: self.files)
    @rule(data=st.data(), size=st.integers(0, 400_000))
    def truncate(self, data, size):
        name = data.draw(st.sampled_from(sorted(self.files)))
        os.truncate(self.root / name, size)
        old = self.files[name]
        self.files[name] = old[:size] + b"\0" * max(0, size - len(old))

    @precondition(lambda self: self.files)
    @rule(data=st.data(), dst=NAMES)
    def rename(self, data, dst):
        src = data.draw(st.sampled_from(sorted(self.files)))
        os.rename(self.root / src, self.root / dst)
        self.files[dst] = self.files.pop(src)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def unlink(self, data):
        name = data.draw(st.sampled_from(sorted(self.files)))
        os.unlink(self.root / name)
        del self.files[name]

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def wait_ingested(self, data):
        name = data.draw(st.sampled_from(sorted(self.files)))
        self.mount.wait_local(f"work/{name}")

    @invariant()
    def agrees(self):
        assert sorted(os.listdir(self.root)) == sorted(self.files)
        for name, content in self.files.items():
            assert os.stat(self.root / name).st_size == len(content)
            assert (self.root / name).read_bytes() == content, name


@pytest.mark.slow
def test_random_file_operations(shared_mount):
    FileModel.mount = shared_mount
    run = FileModel.TestCase
    run.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()
    # After the random run, the metadata is consistent.
    res = shared_mount.cli("fsck", "--cache", str(shared_mount.cache))
    assert "0 problems" in res.stdout
