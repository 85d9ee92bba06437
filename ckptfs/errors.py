"""One error hierarchy for ckptfs; translated to errnos only at the FUSE edge (``fuse/ops.py``)."""

from __future__ import annotations


class CkptfsError(Exception):
    """Base class of every error ckptfs raises on purpose."""


class UserError(CkptfsError):
    """A problem the user can fix (bad flag, missing directory). Printed without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotFound(CkptfsError):
    """A name, inode or version does not exist (ENOENT)."""


class CorruptChunk(CkptfsError):
    """A stored chunk failed its checksum or does not hash to its id (EIO)."""


class ChunkMissing(CorruptChunk):
    """A chunk the metadata names has no frame in the cache (EIO, like any unreadable chunk: a resume loop
    must never read a lost chunk as "no checkpoint here", which ENOENT would say)."""


class FileChanged(CkptfsError):
    """A staging file shrank while it was being read (a concurrent truncate); the reader gives up and the
    version's next seal queues it again."""


class CacheFull(CkptfsError):
    """The cache disk has no room left for new data (ENOSPC)."""


class BackendError(CkptfsError):
    """The object store failed."""


class TransientBackendError(BackendError):
    """A failure worth retrying (timeouts, 5xx, connection resets)."""


class PermanentBackendError(BackendError):
    """A failure retrying will not fix (bad credentials, missing bucket)."""


class NotInStore(CkptfsError):
    """``upload.fsync_remote``: the file did not reach the object store in time (EIO from fsync)."""


class ObjectNotFound(BackendError):
    """The object store has no object under that key."""


class MetadataUnwritable(CkptfsError):
    """The metadata database (or its WAL) cannot be made durable: the daemon cannot go on (failsafe)."""


class Failsafe(CkptfsError):
    """The daemon is in failsafe mode (``health``): the request needs writing, which is refused (EIO)."""


class PosixError(CkptfsError):
    """A namespace rule was violated (EEXIST, ENOTEMPTY, ...); carries the errno to answer with."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or f"errno {errno}")
        self.errno = errno
