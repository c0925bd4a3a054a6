"""Unit tests of tessera.config: config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera import config
from tessera.core import errors
from tessera.core.errors import ConfigError


def test_config_layers_toml_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[node]\nname = "acme"\n[store]\nembedding_dimension = 8\n')
    cfg = config.load(f, environ={"TESSERA_STORE_EMBEDDING_DIMENSION": "16"})
    assert cfg.node.name == "acme" and cfg.store.embedding_dimension == 16


@pytest.mark.parametrize(("env", "setting"), [
    ({"TESSERA_STORE_EMBEDDING_DIMENSION": "many"}, "store.embedding_dimension"),
    ({"TESSERA_STORE_METRIC": "hamming"}, "store.metric"),
    ({"TESSERA_NODE_LISTEN_ADDRESS": "nowhere"}, "node.listen_address"),
    ({"TESSERA_NODE_NAME": "Bad_Name"}, "node.name"),
    ({"TESSERA_TLS_CERT_FILE": "/x.crt"}, "tls"),
    ({"TESSERA_VALKEY_URL": "http://x"}, "valkey.url"),
    ({"TESSERA_STORE_NOPE": "1"}, "store.nope"),
])
def test_bad_setting_names_itself(env: dict[str, str], setting: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        config.load(environ=env)
    assert exc.value.message.startswith(setting)
    assert "\n" not in exc.value.message


def test_unknown_toml_section_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text("[nodes]\nname = 'x'\n")
    with pytest.raises(errors.ConfigError, match=r"unknown section \[nodes\]"):
        config.load(f, environ={})


def _load(**overrides: str) -> config.Config:
    return config.load(None, environ={}, overrides=overrides)


def test_ca_url_without_a_pinned_root_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        _load(**{"ca.url": "https://127.0.0.1:9000"})
    assert info.value.message.startswith("ca.root_fingerprint:")


def test_ca_settings_come_from_environment_variables() -> None:
    fp = "ab" * 32
    cfg = config.load(None, environ={"TESSERA_CA_URL": "https://ca.example.org:9000",
                                     "TESSERA_CA_ROOT_FINGERPRINT": fp,
                                     "TESSERA_CA_RENEW_FRACTION": "0.75"})
    assert (cfg.ca.url, cfg.ca.root_fingerprint, cfg.ca.renew_fraction) == (
        "https://ca.example.org:9000", fp, 0.75)


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("ca.renew_fraction", "0.95", "ca.renew_fraction:"),
    ("ca.crl_url", "ftp://x/crl", "ca.crl_url:"),
    ("ca.crl_refresh_s", "-1", "ca.crl_refresh_s:"),
    ("ca.provisioner_key_file", "/nonexistent/key.json", "ca.provisioner_key_file:"),
])
def test_bad_ca_setting_fails_with_one_line_naming_it(setting: str, value: str,
                                                      named: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(**{setting: value})
    assert info.value.message.startswith(named)
    assert "\n" not in info.value.message


def test_no_ca_configuration_keeps_the_embedded_default() -> None:
    cfg = _load()
    assert cfg.ca.url == "" and cfg.tier == "embedded"


def test_config_validates_tracing_and_log_settings() -> None:
    cfg = config.load(environ={"TESSERA_TRACING_ENDPOINT": "127.0.0.1:4317",
                               "TESSERA_TRACING_SAMPLE_RATIO": "0.25",
                               "TESSERA_LOG_FORMAT": "json"})
    assert (cfg.tracing.endpoint, cfg.tracing.sample_ratio, cfg.log.format) == (
        "127.0.0.1:4317", 0.25, "json")
    assert not cfg.tracing.trust_remote_parent
    for env, setting in ((("TESSERA_TRACING_SAMPLE_RATIO", "1.5"), "tracing.sample_ratio"),
                         (("TESSERA_TRACING_ENDPOINT", "collector"), "tracing.endpoint"),
                         (("TESSERA_LOG_FORMAT", "xml"), "log.format")):
        with pytest.raises(ConfigError, match=setting):
            config.load(environ=dict([env]))


def test_event_loop_is_uvloop_by_default_asyncio_on_request_and_names_itself_when_wrong(
) -> None:
    assert config.load(None, environ={}).node.event_loop == "uvloop"
    assert config.load(None, environ={"TESSERA_NODE_EVENT_LOOP": "asyncio"}
                       ).node.event_loop == "asyncio"
    with pytest.raises(ConfigError, match=r"node\.event_loop: 'trio' must be one of"):
        config.load(None, environ={}, overrides={"node.event_loop": "trio"})


def test_workers_accepts_a_number_or_auto_and_names_itself_when_wrong() -> None:
    assert config.load(None, environ={}, overrides={"node.workers": "3"}).node.worker_count == 3
    auto = config.load(None, environ={}, overrides={"node.workers": "auto"})
    assert auto.node.worker_count == len(os.sched_getaffinity(0))
    assert config.load(None, environ={}, overrides={"node.workers": 2}).node.worker_count == 2
    for bad in ("0", "many", "-1", "257"):
        with pytest.raises(ConfigError, match=r"node\.workers"):
            config.load(None, environ={}, overrides={"node.workers": bad})


def test_changed_settings_names_each_changed_field_in_order(tmp_path: Path) -> None:
    old = config.load(None, environ={})
    new = config.load(None, environ={}, overrides={"ratelimit.local_limits": "read=1/1",
                                                   "store.pool_max": "7",
                                                   "log.level": "debug"})
    assert config.changed_settings(old, new) == ["store.pool_max", "ratelimit.local_limits",
                                                 "log.level"]
    assert config.changed_settings(old, old) == []


def test_with_reloadable_takes_only_the_reloadable_sections() -> None:
    old = config.load(None, environ={})
    new = config.load(None, environ={}, overrides={"ratelimit.local_limits": "read=1/1",
                                                   "store.pool_max": "7",
                                                   "log.access": "false"})
    merged = config.with_reloadable(old, new)
    assert merged.ratelimit.local_limits == "read=1/1"
    assert merged.log.access is False
    assert merged.store.pool_max == old.store.pool_max
    assert config.changed_settings(old, merged) == ["ratelimit.local_limits", "log.access"]


def test_a_config_source_reads_the_file_again_and_survives_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "tessera.toml"
    path.write_text('[ratelimit]\nlocal_limits = "read=5/5"\n')
    source = config.ConfigSource(str(path), {"TESSERA_STORE_POOL_MAX": "9"},
                                 {"node.data_dir": str(tmp_path)})
    again = config.ConfigSource.from_json(source.to_json())
    assert again == source
    cfg = again.load()
    assert (cfg.ratelimit.local_limits, cfg.store.pool_max) == ("read=5/5", 9)
    path.write_text('[ratelimit]\nlocal_limits = "read=6/6"\n')
    assert again.load().ratelimit.local_limits == "read=6/6"
    path.write_text('[ratelimit]\nlocal_limits = "read=x"\n')
    with pytest.raises(ConfigError, match=r"ratelimit\.local_limits"):
        again.load()


@pytest.mark.parametrize("level", ["debug", "INFO", "warning", ""])
def test_log_level_accepts_the_levels(level: str) -> None:
    assert config.load(None, environ={"TESSERA_LOG_LEVEL": level}).log.level == level


def test_log_level_refuses_anything_else() -> None:
    with pytest.raises(ConfigError, match=r"log\.level"):
        config.load(None, environ={"TESSERA_LOG_LEVEL": "loud"})
