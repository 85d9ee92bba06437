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
        ("[mount]\nallow_other = 'maybe'\n", "true or false"),
        ("not toml = = =", "cannot read"),
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
