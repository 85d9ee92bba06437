"""Configuration: one frozen tree, loaded once with precedence flags > ``CKPTFS_*`` env > TOML > defaults.

Each component receives only its own section. ``load()`` validates and raises ``UserError`` with a
one-line message naming the offending key.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ckptfs.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_CONFIG_FILE = Path("/etc/ckptfs/ckptfs.toml")
MiB = 1024 * 1024


def _default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/ckptfs/cache"
    return str(Path.home() / ".cache" / "ckptfs")


def _default_store_url() -> str:
    if os.geteuid() == 0:
        return "file:///var/lib/ckptfs/objects"
    return "file://" + str(Path.home() / ".local" / "share" / "ckptfs" / "objects")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The local NVMe cache: staging files, chunk cache and the metadata database."""

    dir: str = field(default_factory=_default_cache_dir)
    reserve_mb: int = 64  # writes fail with ENOSPC when less than this is free on the cache disk
    decoded_cache_mb: int = 64  # in-memory cache of decoded chunks for reads
    read_threads: int = 4  # chunks a sequential read decodes ahead at once (the cores a restore's decoding takes)
    direct_io: bool = True  # write chunk files with O_DIRECT where the file system supports it
    durable_after_s: float = 2.0  # a closed file ingest has not committed by then gets an fsync of its own
    max_gb: float = 0.0  # chunk files + staged bytes kept at most; uploaded chunks are evicted past it (0 = no cap)
    max_percent: float = 0.0  # the same cap as a share of the cache disk (0 = none; both: the smaller)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where chunks are tiered to: ``file:///path`` (embedded default) or ``s3://bucket/prefix``."""

    url: str = field(default_factory=_default_store_url)


@dataclass(frozen=True, slots=True)
class S3Config:
    """How to reach an ``s3://`` store. Empty strings leave the value to boto3's standard chain
    (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/``, ...)."""

    endpoint: str = ""  # e.g. http://127.0.0.1:8333 for a server that is not AWS
    region: str = ""
    addressing_style: str = "auto"  # auto | path | virtual
    profile: str = ""  # a profile of ~/.aws/config
    access_key_id: str = ""  # prefer the environment or a profile; never logged
    secret_access_key: str = ""
    retries: int = 8  # attempts per request on 5xx, SlowDown, timeouts and resets (backoff with jitter)
    multipart_mb: int = 64  # objects above this go up as multipart uploads in parts of this size
    timeout_s: float = 30.0  # connect and read timeout of one request


@dataclass(frozen=True, slots=True)
class UploadConfig:
    """The uploader that tiers durable local versions to the store."""

    enabled: bool = True  # false: nothing leaves the cache (versions stay 'local')
    concurrency: int = 8  # requests in flight at once (also sizes the S3 connection pool)
    bandwidth_mb: float = 0.0  # MB/s cap on uploads (0 = no cap)
    interval_s: float = 0.5  # how often the uploader looks for work when not woken
    compact_wait_s: float = 30.0  # a version waits this long for pcodec compaction before it goes up (flush: none)
    fsync_remote: bool = False  # fsync(2) of a closed file returns once it is in the store (EIO after the timeout)
    fsync_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """This node's identity in a shared bucket."""

    id: str = ""  # default: the host name (CKPTFS_NODE_ID)
    refresh_s: float = 2.0  # how often other nodes' journal segments are looked for (0 = never)
    gc_view_s: float = 600.0  # the oldest view of the store's gc records a journal segment is put with


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """The background pipeline that turns staged versions into chunks."""

    threads: int = 0  # worker threads for hashing/compression; 0 = cores - 1 (at least 1)
    files_at_once: int = 2  # sealed versions ingested concurrently
    zstd_level: int = 1  # on byte planes of floats, level 1 is smaller than 3 and twice as fast
    pco_level: int = 10  # pcodec level for recompressing float chunks when ingest is idle (0 = off)
    piece_mb: int = 4  # size of the fixed pieces a tensor record is cut into
    cdc_avg_kb: int = 1024  # average content-defined chunk size for unparsed files
    nice: int = 10  # niceness of worker threads (0 disables); the trainer keeps priority
    idle: bool = True  # encoding runs SCHED_IDLE: only on cores the trainer leaves idle (files.workers)
    idle_backlog_mb: int = 2048  # staged bytes above which encoding stops waiting for idle cores
    idle_wait_s: float = 60.0  # a version waiting this long for ingest stops waiting for idle cores
    idle_cores: float = 0.5  # compaction waits until other processes leave this many cores free (0 = never)
    max_chain: int = 4  # deltas a read decodes at most (1 = every delta is against a keyframe; 0 = no delta)
    base_grace_s: int = 600  # slot entries of deleted files (and chunks only they hold) are released after this
    base_cache_mb: int = 512  # plain bytes of recent pieces kept in memory as the next version's bases
    newest_keyframe: bool = False  # reverse deltas in idle time: the newest of a layout a keyframe (files.reverse)
    flat_newest: bool = True  # the newest of a layout also kept decoded in the cache (files.flatten)


@dataclass(frozen=True, slots=True)
class MountConfig:
    """FUSE mount options."""

    allow_other: bool = True  # only honoured when running as root
    drain_seconds: float = 120.0  # on unmount, wait this long for staged versions to be ingested
    fuse_device: str = "/dev/fuse"
    read_ahead_kb: int = 4096  # the kernel's read-ahead for the mount (root only; 0 = the kernel's 128)
    direct_writes: bool = True  # write-only opens bypass the kernel's page cache (fuse.ops; kernel >= 6.6)


@dataclass(frozen=True, slots=True)
class Config:
    cache: CacheConfig = field(default_factory=CacheConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    s3: S3Config = field(default_factory=S3Config)
    upload: UploadConfig = field(default_factory=UploadConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    mount: MountConfig = field(default_factory=MountConfig)


_SECTIONS = {
    "cache": CacheConfig,
    "store": StoreConfig,
    "s3": S3Config,
    "upload": UploadConfig,
    "node": NodeConfig,
    "ingest": IngestConfig,
    "mount": MountConfig,
}


# Variables that are not settings: the config file, and hooks for tests (docs: README, "Configuration").
_OTHER_ENV = {"CKPTFS_CONFIG", "CKPTFS_BOOT_ID", "CKPTFS_FAILPOINTS", "CKPTFS_DEMO_DIR"}
_OTHER_ENV_PREFIXES = ("CKPTFS_TEST_",)


def _coerce(where: str, raw: Any, typ: type[Any], text: bool) -> Any:
    """``raw`` as a ``typ``. From TOML or the command line (``text`` False) the value must already have
    the type (an int is also a float); from the environment (``text`` True) it is parsed from its text.
    ``where`` names the setting in the message."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if text and isinstance(raw, str) and raw.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return raw.lower() in {"1", "true", "yes", "on"}
        raise UserError(f"config: {where} must be true or false, got {raw!r}")
    if typ in (int, float):  # an int is also a float, never the other way round
        accepted = (int,) if typ is int else (int, float)
        if isinstance(raw, accepted) and not isinstance(raw, bool):
            return typ(raw)
        if text and isinstance(raw, str):
            try:
                return typ(raw.strip())
            except ValueError:
                pass
        raise UserError(f"config: {where} must be {'an integer' if typ is int else 'a number'}, got {raw!r}")
    if typ is str and isinstance(raw, str):
        return raw
    raise UserError(f"config: {where} must be a {typ.__name__}, got {raw!r}")


def _apply(
    cfg: Config, section: str, values: dict[str, Any], source: str, names: dict[str, str] | None = None
) -> Config:
    """Set ``values`` of ``section``. ``names`` (from the environment) maps each key to the variable it
    came from, for messages; those values are text."""
    cls = _SECTIONS.get(section)
    if cls is None:
        raise UserError(f"config: unknown section [{section}] in {source}")
    current = getattr(cfg, section)
    types = {f.name: type(getattr(current, f.name)) for f in fields(cls)}
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in types:
            raise UserError(f"config: unknown key {section}.{key} in {source}")
        where = f"{section}.{key}" if names is None else f"{names[key]} ({section}.{key})"
        changes[key] = _coerce(where, raw, types[key], names is not None)
    return replace(cfg, **{section: replace(current, **changes)})


def _unknown_env(env: dict[str, str] | os._Environ[str]) -> list[str]:
    """``CKPTFS_*`` variables that name no setting (a typo is otherwise silently ignored)."""
    known = {f"CKPTFS_{s.upper()}_{f.name.upper()}" for s, cls in _SECTIONS.items() for f in fields(cls)}
    known |= _OTHER_ENV
    return sorted(
        n for n in env if n.startswith("CKPTFS_") and n not in known and not n.startswith(_OTHER_ENV_PREFIXES)
    )


def load(
    path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the configuration. ``path=None`` reads ``/etc/ckptfs/ckptfs.toml`` when it exists.

    Environment variables are ``CKPTFS_<SECTION>_<KEY>`` (for example ``CKPTFS_CACHE_DIR``).
    Raises ``UserError`` for an unreadable file, unknown keys or wrong types.
    """
    env = os.environ if environ is None else environ
    cfg = Config()
    file = Path(path) if path else (Path(env["CKPTFS_CONFIG"]) if "CKPTFS_CONFIG" in env else None)
    if file is None and DEFAULT_CONFIG_FILE.exists():
        file = DEFAULT_CONFIG_FILE
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise UserError(f"config: file {file} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"config: cannot read {file}: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise UserError(f"config: {section} in {file} must be a [section]")
            cfg = _apply(cfg, section, values, str(file))
    for section, cls in _SECTIONS.items():
        env_values, names = {}, {}
        for f in fields(cls):
            name = f"CKPTFS_{section.upper()}_{f.name.upper()}"
            if name in env:
                env_values[f.name], names[f.name] = env[name], name
        if env_values:
            cfg = _apply(cfg, section, env_values, "the environment", names)
    known = [f"CKPTFS_{s.upper()}_{f.name.upper()}" for s, cls in _SECTIONS.items() for f in fields(cls)]
    for name in _unknown_env(env):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        log.warning("environment variable %s is not a ckptfs setting and is ignored%s", name, hint)
    for section, values in (overrides or {}).items():
        cfg = _apply(cfg, section, {k: v for k, v in values.items() if v is not None}, "the command line")
    return validate(cfg)


def validate(cfg: Config) -> Config:
    """Reject contradictions and resolve automatic values. Raises ``UserError``."""
    ing = cfg.ingest
    if not 1 <= ing.zstd_level <= 22:
        raise UserError(f"config: ingest.zstd_level must be within 1..22, got {ing.zstd_level}")
    if not 0 <= ing.pco_level <= 12:
        raise UserError(f"config: ingest.pco_level must be within 0..12 (0 = off), got {ing.pco_level}")
    if not 1 <= ing.piece_mb <= 64:
        raise UserError(f"config: ingest.piece_mb must be within 1..64, got {ing.piece_mb}")
    if not 64 <= ing.cdc_avg_kb <= 4096:
        raise UserError(f"config: ingest.cdc_avg_kb must be within 64..4096, got {ing.cdc_avg_kb}")
    if ing.threads < 0 or ing.files_at_once < 1:
        raise UserError("config: ingest.threads must be >= 0 and ingest.files_at_once >= 1")
    if not 0 <= ing.max_chain <= 16:
        raise UserError(f"config: ingest.max_chain must be within 0..16, got {ing.max_chain}")
    if ing.base_grace_s < 0:
        raise UserError("config: ingest.base_grace_s must be >= 0")
    if not 0 <= ing.nice <= 19:
        raise UserError(f"config: ingest.nice must be within 0..19, got {ing.nice}")
    if ing.idle_cores < 0:
        raise UserError(f"config: ingest.idle_cores must be >= 0, got {ing.idle_cores}")
    if ing.idle_wait_s < 0:
        raise UserError(f"config: ingest.idle_wait_s must be >= 0, got {ing.idle_wait_s}")
    if ing.idle_backlog_mb < 0:
        raise UserError(f"config: ingest.idle_backlog_mb must be >= 0, got {ing.idle_backlog_mb}")
    if ing.threads == 0:
        cfg = replace(cfg, ingest=replace(ing, threads=max(1, (os.cpu_count() or 2) - 1)))
    if cfg.cache.reserve_mb < 0 or cfg.cache.decoded_cache_mb < 8:
        raise UserError("config: cache.reserve_mb must be >= 0 and cache.decoded_cache_mb >= 8")
    if not 1 <= cfg.cache.read_threads <= 256:
        raise UserError(f"config: cache.read_threads must be within 1..256, got {cfg.cache.read_threads}")
    if "," in cfg.cache.dir:
        raise UserError(f"config: cache.dir must not contain a comma: {cfg.cache.dir}")
    if not 0 <= cfg.mount.read_ahead_kb <= 1024 * 1024:
        raise UserError(f"config: mount.read_ahead_kb must be within 0..1048576, got {cfg.mount.read_ahead_kb}")
    if cfg.mount.drain_seconds < 0:
        raise UserError("config: mount.drain_seconds must be >= 0")
    s3 = cfg.s3
    if s3.addressing_style not in ("auto", "path", "virtual"):
        raise UserError(f"config: s3.addressing_style must be auto, path or virtual, got {s3.addressing_style!r}")
    if not 1 <= s3.retries <= 100:
        raise UserError(f"config: s3.retries must be within 1..100, got {s3.retries}")
    up = cfg.upload
    if not 1 <= up.concurrency <= 256:
        raise UserError(f"config: upload.concurrency must be within 1..256, got {up.concurrency}")
    if up.compact_wait_s < 0 or up.fsync_timeout_s <= 0:
        raise UserError("config: upload.compact_wait_s must be >= 0 and upload.fsync_timeout_s > 0")
    if up.bandwidth_mb < 0 or not 0.01 <= up.interval_s <= 60:
        raise UserError("config: upload.bandwidth_mb must be >= 0 and upload.interval_s within 0.01..60")
    if not 5 <= s3.multipart_mb <= 5120:
        raise UserError(f"config: s3.multipart_mb must be within 5..5120 (S3's part sizes), got {s3.multipart_mb}")
    if not 0 < s3.timeout_s <= 3600:
        raise UserError(f"config: s3.timeout_s must be within 0..3600, got {s3.timeout_s}")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise UserError("config: s3.access_key_id and s3.secret_access_key must be given together")
    if s3.endpoint and not s3.endpoint.startswith(("http://", "https://")):
        raise UserError(f"config: s3.endpoint must be an http:// or https:// URL, got {s3.endpoint!r}")
    if not 0 <= cfg.node.refresh_s <= 3600:
        raise UserError(f"config: node.refresh_s must be within 0..3600, got {cfg.node.refresh_s}")
    if not 0 < cfg.node.gc_view_s <= 86400:
        raise UserError(f"config: node.gc_view_s must be within 0..86400 seconds (not 0), got {cfg.node.gc_view_s}")
    node_id = cfg.node.id or socket.gethostname()
    if not node_id or not all(ch.isalnum() or ch in "-_." for ch in node_id) or len(node_id) > 64:
        raise UserError(f"config: node.id must be 1..64 letters, digits, '-', '_' or '.', got {node_id!r}")
    cfg = replace(cfg, node=replace(cfg.node, id=node_id))
    if cfg.cache.max_gb < 0 or not 0 <= cfg.cache.max_percent <= 100:
        raise UserError("config: cache.max_gb must be >= 0 and cache.max_percent within 0..100")
    if not 0 <= cfg.cache.durable_after_s <= 3600:
        raise UserError(f"config: cache.durable_after_s must be within 0..3600, got {cfg.cache.durable_after_s}")
    return cfg
