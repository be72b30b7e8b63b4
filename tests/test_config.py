"""Strict config: every bad key is named, with the file; the bundled file is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from pushd.config import ConfigError, load_config, merge_for_reload, parse_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pushd.toml"
    p.write_text(text)
    return p


def test_bundled_config_is_valid_and_resolves_relative_to_itself() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.apns.environment == "simulator"
    assert cfg.socket_path == ROOT / "var" / "run" / "control.sock"
    assert cfg.database_path == ROOT / "var" / "lib" / "pushd.sqlite3"
    assert cfg.control.mode == 0o660
    assert [c.id for c in cfg.classes] == ["needs-update", "everyone"]


def test_empty_file_gives_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.nodes.count == 2
    assert cfg.daemon.shutdown_timeout == 10.0
    assert cfg.database_path == tmp_path / "var" / "lib" / "pushd.sqlite3"


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[nodes]\ncuont = 3\n", "nodes.cuont", "unknown key (did you mean 'count'?)"),
        ("[nodez]\ncount = 3\n", "nodez", "unknown key (did you mean 'nodes'?)"),
        ("[nodes]\ncount = '3'\n", "nodes.count", "Input should be a valid integer"),
        ("[nodes]\ncount = 0\n", "nodes.count", "greater than or equal to 1"),
        ("[daemon]\nlog_level = 'loud'\n", "daemon.log_level", "Input should be"),
        ("[apns]\nport = 70000\n", "apns.port", "less than or equal to 65535"),
        ("[apns]\ntoken_refresh = 600.0\n", "apns.token_refresh", "greater than or equal to 1200"),
        ("[apns]\ntoken_refresh = 3600.0\n", "apns.token_refresh", "less than 3600"),
        ("[apns]\nenvironment = 'production'\n", "apns", "token auth needs key_file"),
        ("[supervisor]\nbackoff_initial = 10.0\nbackoff_max = 1.0\n", "supervisor", "backoff_max"),
        ("[[classes]]\nid = 'x'\nrule = { field = 'device.os_version', semver_lt = 17 }\n", "classes[0].rule", ""),
        ("[[classes]]\nid = 'x'\nrul = 'always'\n", "classes[0].rul", "unknown key (did you mean 'rule'?)"),
        ("[codes]\ncurrent = 'k9'\n", "codes.current", "not in codes.keys"),
        ("[codes]\ncurrent = 'k1'\nkeys = { k1 = 'hex:abcd' }\n", "codes.keys.k1", "at least 32 needed"),
        ("[codes]\ncurrent = 'k 1'\nkeys = { 'k 1' = 'file:k' }\n", "codes.keys.k 1", "a key id is"),
        ("[[classes]]\nid = 'x'\ndescription = 'no rule'\n", "classes[0].rule", "Field required"),
        ("[nodes]\nshard_by = 'region'\n", "nodes.regions", "required"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert any(p.key.startswith(key) and message in p.message for p in err.problems), err.problems
    assert str(path) in str(err)


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[nodes]\ncount = -1\nbatch = 'x'\n[control]\nsock = 'a'\n"))
    assert sorted(info.value.keys) == ["control.sock", "nodes.batch", "nodes.count"]


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(syntax\)"):
        load_config(write(tmp_path, "[nodes\n"))
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")


def test_reload_merge_keeps_restart_only_settings(tmp_path: Path) -> None:
    old = parse_config({"nodes": {"count": 2}, "control": {"socket": "a.sock"}, "daemon": {"log_level": "info"}})
    new = parse_config({"nodes": {"count": 4}, "control": {"socket": "b.sock"}, "daemon": {"log_level": "debug"}})
    effective, applied, restart = merge_for_reload(old, new)
    assert effective.nodes.count == 4
    assert effective.daemon.log_level == "debug"
    assert effective.control.socket == "a.sock"
    assert restart == ["control.socket"]
    assert set(applied) == {"nodes.count", "daemon.log_level"}
