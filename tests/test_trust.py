"""The trust model of cache folders (safeclip._trust): the per-user key outside every cache, the MACs made with it,
and which folders count as nobody else's."""

from __future__ import annotations

import logging
import os
import stat
import tempfile

import pytest

from safeclip import _trust
from safeclip.errors import CacheError


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A fresh config home (where the key is made) and temp folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(_trust.KEY_FILE_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "config"


def test_the_key_is_made_once_private_and_outside_the_cache(config):
    m = _trust.mac("purpose", {"a": [1, 2.5, None]})
    key = config / "safeclip" / "cache.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert _trust.verify("purpose", {"a": [1, 2.5, None]}, m)
    assert not _trust.verify("another purpose", {"a": [1, 2.5, None]}, m)  # a MAC passes for its purpose only
    assert not _trust.verify("purpose", {"a": [1, 2.5]}, m) and not _trust.verify("purpose", {}, None)
    assert len(_trust.key_id()) == 8 and _trust.key_id() not in key.read_text()


def test_a_key_others_can_read_is_refused_naming_the_fix(config):
    _trust.key_id()
    key = config / "safeclip" / "cache.key"
    os.chmod(key, 0o644)
    _trust._keys.clear()  # a new process
    with pytest.raises(CacheError, match=r"open to others \(mode 644\).*chmod 600"):
        _trust.key_id()
    key.write_text("not a key\n")
    os.chmod(key, 0o600)
    with pytest.raises(CacheError, match="not a safeclip cache key.*delete it"):
        _trust.key_id()


def test_without_a_writable_config_home_the_key_is_kept_in_a_private_temp_folder(config, tmp_path, monkeypatch,
                                                                               caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocked))  # the key's folder cannot be made
    with caplog.at_level(logging.WARNING, logger="safeclip"):
        first = _trust.key_id()
    spare = tmp_path / "tmp" / f"safeclip-{os.getuid()}" / "cache.key"
    assert spare.is_file() and stat.S_IMODE(spare.parent.stat().st_mode) == 0o700
    assert [r for r in caplog.records if "lost at reboot" in r.getMessage()]
    _trust._keys.clear()
    assert _trust.key_id() == first  # the next process finds it


def test_who_can_write_a_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert _trust.untrusted(d) is None and _trust.untrusted(tmp_path / "missing") is None
    os.chmod(d, 0o777)
    assert _trust.untrusted(d) == "can be written by every user"
    assert _trust.first_untrusted(tmp_path, "d/x/y") == (d, "can be written by every user")
    assert "chmod go-w" in _trust.fix_for(d, "can be written by every user")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chmod(d, 0o700)
        os.chown(d, 65534, 65534)
        assert _trust.untrusted(d).startswith("is owned by")
