from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from snapshotter import config, errors
from snapshotter.cli import EXIT_CODES, main


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_flags(p)
    return p.parse_args(list(argv))


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root = "/from/file"\ncache_size = "1GiB"\nlazy = false\n'
                 'repository_roots = ["/a", "/b"]\n')
    cfg = config.load(_args("--config", str(f), "--cache-size", "2GiB"))
    assert cfg.root == Path("/from/file")
    assert cfg.cache_bytes == 2 * 1024**3
    assert cfg.lazy is False
    assert cfg.repository_roots == ["/a", "/b"]
    cfg = config.load(_args("--config", str(f), "--lazy", "--repository-roots", "/x,/y"))
    assert cfg.lazy is True and cfg.repository_roots == ["/x", "/y"]


def test_every_key_is_a_flag() -> None:
    p = argparse.ArgumentParser()
    config.add_flags(p)
    flags = {a.dest for a in p._actions}
    import dataclasses

    assert {f.name for f in dataclasses.fields(config.Config)} <= flags


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus = 1\n", "bogus"),
        ('cache_size = "lots"\n', "cache_size"),
        ("lazy = 3\n", "lazy"),
        ('log_level = "loud"\n', "log_level"),
        ("root = [\n", "c.toml"),
    ],
)
def test_bad_config(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(errors.InvalidArgument, match=needle):
        config.load(_args("--config", str(f)))


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound):
        config.load(_args("--config", str(tmp_path / "nope.toml")))


def test_missing_default_config_is_fine(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert config.load(_args()).root == Path("/var/lib/lazysnap")


def test_exit_codes_cover_every_category(tmp_path: Path, capsys) -> None:
    assert set(EXIT_CODES) == set(errors.CATEGORIES)
    rc = main(["serve", "--config", str(tmp_path / "nope.toml")])
    assert rc == EXIT_CODES[errors.NotFound]
    assert "nope.toml" in capsys.readouterr().err
