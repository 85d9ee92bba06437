"""Config precedence and validation."""

from __future__ import annotations

import pytest

from ckptfs import config
from ckptfs.errors import UserError


def test_precedence_flags_over_env_over_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[cache]\ndir = "/from/file"\nreserve_mb = 7\n[ingest]\nzstd_level = 5\n')
    env = {"CKPTFS_CACHE_DIR": "/from/env"}
    cfg = config.load(str(f), {"cache": {"dir": "/from/flag"}}, env)
    assert cfg.cache.dir == "/from/flag" and cfg.cache.reserve_mb == 7 and cfg.ingest.zstd_level == 5
    cfg = config.load(str(f), {}, env)
    assert cfg.cache.dir == "/from/env"
    assert config.load(None, {}, {}).ingest.threads >= 1


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[ingest]\nzstd_level = 30\n", "zstd_level"),
        ("[nope]\nx = 1\n", "unknown section"),
        ("[cache]\ncolour = 1\n", "unknown key cache.colour"),
        ("[cache]\nreserve_mb = 'lots'\n", "must be an integer"),
        ("[cache]\nreserve_mb = 10.5\n", "cache.reserve_mb must be an integer, got 10.5"),
        ('[cache]\nreserve_mb = "10"\n', "cache.reserve_mb must be an integer, got '10'"),
        ('[mount]\ndrain_seconds = "5"\n', "must be a number"),
        ("[mount]\nallow_other = 1\n", "true or false"),
        ("[cache]\ndir = 5\n", "cache.dir must be a str"),
        ("[mount]\nallow_other = 'maybe'\n", "true or false"),
        ("not toml = = =", "cannot read"),
        ("[s3]\naddressing_style = 'sideways'\n", "s3.addressing_style must be auto, path or virtual"),
        ("[s3]\nmultipart_mb = 1\n", "s3.multipart_mb must be within 5..5120"),
        ("[s3]\naccess_key_id = 'AK'\n", "must be given together"),
        ("[s3]\nendpoint = '127.0.0.1:9000'\n", "s3.endpoint must be an http:// or https:// URL"),
        ("[node]\nid = 'a/b'\n", "node.id must be"),
        ("[cache]\nread_threads = 0\n", "cache.read_threads must be within 1..256, got 0"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(str(f), {}, {})
    assert needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        config.load("/no/such/file.toml", {}, {})


def test_env_bool_and_int_coercion():
    cfg = config.load(None, {}, {"CKPTFS_MOUNT_ALLOW_OTHER": "false", "CKPTFS_INGEST_PIECE_MB": "8"})
    assert cfg.mount.allow_other is False and cfg.ingest.piece_mb == 8


def test_toml_numbers_keep_their_type_where_the_setting_allows():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write("[mount]\ndrain_seconds = 5\n[cache]\ndurable_after_s = 0.5\n")
        f.flush()
        cfg = config.load(f.name, {}, {})
    assert cfg.mount.drain_seconds == 5.0 and cfg.cache.durable_after_s == 0.5


@pytest.mark.parametrize("value", ["10.5", "ten", ""])
def test_an_environment_error_names_the_variable(value):
    with pytest.raises(UserError) as e:
        config.load(None, {}, {"CKPTFS_CACHE_RESERVE_MB": value})
    assert "CKPTFS_CACHE_RESERVE_MB" in str(e.value) and "must be an integer" in str(e.value)


def test_a_misspelled_variable_is_named_in_a_warning(caplog):
    env = {"CKPTFS_CACHE_RESERV_MB": "10", "CKPTFS_BOOT_ID": "x", "CKPTFS_TEST_DISALLOW_SKIP": "fuse"}
    with caplog.at_level("WARNING"):
        cfg = config.load(None, {}, env)
    assert cfg.cache.reserve_mb == 64  # ignored
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "CKPTFS_CACHE_RESERV_MB" in warned[0] and "CKPTFS_CACHE_RESERVE_MB" in warned[0]


def test_node_id_defaults_to_the_host_name_and_comes_from_the_environment():
    import socket

    assert config.load(None, {}, {}).node.id == socket.gethostname()
    assert config.load(None, {}, {"CKPTFS_NODE_ID": "rank-3"}).node.id == "rank-3"


def test_s3_urls():
    from ckptfs.backend import open_store
    from ckptfs.backend.s3 import S3Store

    cfg = config.load(None, {}, {"CKPTFS_S3_ENDPOINT": "http://127.0.0.1:9", "CKPTFS_S3_REGION": "us-east-1"})
    store = open_store("s3://my-bucket/some/prefix/", cfg.s3)
    assert isinstance(store, S3Store)
    assert (store.bucket, store._key("chunks/x")) == ("my-bucket", "some/prefix/chunks/x")
    assert open_store("s3://my-bucket", cfg.s3)._key("k") == "k"  # type: ignore[attr-defined]
    for bad in ("s3:///prefix", "s3://a/x", "s3://bad_bucket!/x"):
        with pytest.raises(UserError, match="valid bucket"):
            open_store(bad, cfg.s3)
    with pytest.raises(UserError, match="unknown URL scheme"):
        open_store("ftp://x/y")


def test_the_example_config_names_every_key_and_loads():
    import dataclasses
    import tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "systemd" / "ckptfs.toml.example"
    data = tomllib.loads(path.read_text())
    for section in ("cache", "store", "s3", "upload", "node", "ingest", "mount"):
        keys = {f.name for f in dataclasses.fields(getattr(config.Config(), section))}
        assert set(data.get(section, {})) == keys, section
    config.load(str(path), {}, {})


@pytest.mark.parametrize(
    ("release", "ok"),
    [
        ("6.18.0-cloud-amd64", True),
        ("6.6.1", True),
        ("6.5.0-41-generic", False),
        ("5.15.0", False),
        ("7.0", True),
        ("x", False),
    ],
)
def test_direct_writes_need_a_kernel_that_drops_pages_under_them(release, ok):
    from ckptfs.fuse import direct_writes_supported

    assert direct_writes_supported(release) is ok
