"""Loading a KME's YAML config: paths, refusals that name file and field, env overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kme.config import KeyLimits, KmeConfig, Link, load
from kme.rate_model import rate_from_loss
from qgw.errors import ConfigError

BASE: dict[str, Any] = {
    "kme_id": "KME_A",
    "listen": {"host": "0.0.0.0", "port": 8443},
    "tls": {"ca": "pki/ca.pem", "cert": "pki/kme/KME_A.pem", "key": "pki/kme/KME_A.key"},
    "store": "state/KME_A.sqlite",
    "saes": {"SAE_1": "KME_A", "SAE_2": "KME_B"},
    "links": [{"peer": "KME_B", "url": "https://kme-b:8443", "loss_db": 10}],
}


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """An override left in the environment of the test run must not leak into these tests."""
    import os
    for name in list(os.environ):
        if name.startswith("QGW_KME"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, data: Any, name: str = "conf/kme.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def refused(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert info.value.source == str(path)
    return info.value


def test_example_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE))
    assert cfg.kme_id == "KME_A" and cfg.listen.port == 8443 and cfg.metrics is None
    assert cfg.limits == KeyLimits()
    link = cfg.link_to("KME_B")
    assert link is not None and link.url == "https://kme-b:8443"
    assert link.rate_bps == pytest.approx(rate_from_loss(10))
    assert cfg.link_to("KME_C") is None


def test_relative_paths_are_resolved_against_the_file_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    cfg = load(write(tmp_path, BASE))
    assert cfg.tls.ca == folder / "pki/ca.pem"
    assert cfg.tls.cert == folder / "pki/kme/KME_A.pem"
    assert cfg.tls.key == folder / "pki/kme/KME_A.key"
    assert cfg.store == folder / "state/KME_A.sqlite"
    files = cfg.tls.files()
    assert (files.ca, files.cert, files.key) == (cfg.tls.ca, cfg.tls.cert, cfg.tls.key)


def test_relative_config_path_from_another_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    cfg = load(Path("conf/kme.yaml"))
    assert cfg.tls.ca.resolve() == (tmp_path / "conf/pki/ca.pem").resolve()
    assert cfg.store.resolve() == (tmp_path / "conf/state/KME_A.sqlite").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    tls = {"ca": "/etc/qgw/ca.pem", "cert": "/etc/qgw/a.pem", "key": "/etc/qgw/a.key"}
    cfg = load(write(tmp_path, with_(tls=tls, store="/var/lib/qgw/a.sqlite")))
    assert cfg.tls.ca == Path("/etc/qgw/ca.pem") and cfg.store == Path("/var/lib/qgw/a.sqlite")


@pytest.mark.parametrize("data, field", [
    (with_(colour="red"), "colour"),
    (with_(listen={"host": "0.0.0.0", "prot": 8443}), "listen.prot"),
    (with_(links=[{**BASE["links"][0], "loss": 3}]), "links.0.loss"),
    (with_(limits={"max_keys": 3}), "limits.max_keys"),
])
def test_unknown_field_is_refused_naming_file_and_field(
        tmp_path: Path, data: dict[str, Any], field: str) -> None:
    err = refused(write(tmp_path, data))
    assert err.field == field
    assert field in str(err) and "unknown field" in str(err)


@pytest.mark.parametrize("data, field", [
    (with_(listen={"port": "abc"}), "listen.port"),
    (with_(listen={"port": 70000}), "listen.port"),
    (with_(saes=["SAE_1"]), "saes"),
    (with_(links=[{**BASE["links"][0], "loss_db": "far"}]), "links.0.loss_db"),
    (with_(links=[{**BASE["links"][0], "loss_db": -1}]), "links.0.loss_db"),
    (with_(limits={"key_size": 100}), "limits.key_size"),
    (with_(tick_s=0), "tick_s"),
    ({k: v for k, v in BASE.items() if k != "tls"}, "tls"),
])
def test_wrong_type_or_value_is_refused_naming_the_field(
        tmp_path: Path, data: dict[str, Any], field: str) -> None:
    err = refused(write(tmp_path, data))
    assert err.field == field
    assert f": {field}: " in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = refused(tmp_path / "nope.yaml")
    assert "does not exist" in str(err)


@pytest.mark.parametrize("text, message", [
    ("kme_id: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_file_that_is_not_a_yaml_mapping(tmp_path: Path, text: str, message: str) -> None:
    assert message in str(refused(write(tmp_path, text)))


def test_env_override_sets_a_nested_field_with_its_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE)
    monkeypatch.setenv("QGW_KME__LISTEN__PORT", "9999")
    monkeypatch.setenv("QGW_KME__METRICS__PORT", "9100")  # a section the file lacks
    monkeypatch.setenv("QGW_KME__PEER_TIMEOUT_S", "1.5")
    monkeypatch.setenv("QGW_KMEX__LISTEN__PORT", "1")  # another prefix: ignored
    cfg = load(path)
    assert cfg.listen.port == 9999 and cfg.listen.host == "0.0.0.0"
    assert cfg.metrics is not None and cfg.metrics.port == 9100
    assert cfg.peer_timeout_s == 1.5
    assert load(path).listen.port == 9999  # the file itself is unchanged: the env is re-read
    monkeypatch.delenv("QGW_KME__LISTEN__PORT")
    assert load(path).listen.port == 8443


def test_env_override_with_a_bad_value_names_the_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QGW_KME__LISTEN__PORT", "not-a-port")
    err = refused(write(tmp_path, BASE))
    assert err.field == "listen.port"


def test_env_override_of_a_mixed_case_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every field can be overridden, including the ETSI-named max_SAE_ID_count.
    monkeypatch.setenv("QGW_KME__LIMITS__MAX_SAE_ID_COUNT", "4")
    cfg = load(write(tmp_path, BASE))
    assert cfg.limits.max_SAE_ID_count == 4


@pytest.mark.parametrize("url", ["http://kme-b:8443", "kme-b:8443", "ws://kme-b:8443",
                                 "HTTP://kme-b", ""])
def test_link_url_must_be_https(tmp_path: Path, url: str) -> None:
    err = refused(write(tmp_path, with_(links=[{**BASE["links"][0], "url": url}])))
    assert err.field == "links.0.url" and "https://" in str(err)


def test_link_url_trailing_slash_is_dropped() -> None:
    assert Link(peer="KME_B", url="https://kme-b:8443/").url == "https://kme-b:8443"


@pytest.mark.parametrize("limits", [
    {"min_key_size": 512},                      # min above the default key_size (256)
    {"key_size": 16384},                        # above the default max_key_size
    {"key_size": 128, "max_key_size": 64},
    {"min_key_size": 1024, "max_key_size": 512, "key_size": 768},
])
def test_key_limits_must_be_ordered(tmp_path: Path, limits: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="min_key_size <= key_size <= max_key_size"):
        KeyLimits(**limits)
    err = refused(write(tmp_path, with_(limits=limits)))
    assert err.field == "limits" and "min_key_size <= key_size <= max_key_size" in str(err)


def test_key_limits_accept_equal_bounds() -> None:
    lim = KeyLimits(min_key_size=256, key_size=256, max_key_size=256)
    assert lim.min_key_size == lim.key_size == lim.max_key_size == 256


@pytest.mark.parametrize("change, message", [
    ({"links": [BASE["links"][0], BASE["links"][0]]}, "same peer"),
    ({"links": [{"peer": "KME_A", "url": "https://kme-a"}]}, "itself"),
    ({"saes": {"SAE_2": "KME_B"}, "links": []}, "neither an SAE nor a link"),
])
def test_inconsistent_config_is_refused(tmp_path: Path, change: dict[str, Any],
                                        message: str) -> None:
    assert message in str(refused(write(tmp_path, with_(**change))))


def test_a_trusted_node_needs_no_sae(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, with_(saes={"SAE_2": "KME_B"})))
    assert cfg.links and "KME_A" not in cfg.saes.values()


def test_block_size_grows_with_the_rate() -> None:
    rates = [0, 100, 1_000, 10_000, 100_000, 1e6, 1e7, 1e8, 1e9]
    sizes = [Link(peer="B", url="https://b", key_rate_bps=r).block_size for r in rates]
    assert sizes == sorted(sizes) and len(set(sizes)) > 4
    assert sizes[0] == 32 and sizes[-1] == 65536  # bounds: 32 B to 64 KiB
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two
    # About 20 blocks a second: a block is at least a 20th of a second of key.
    for r, s in zip(rates, sizes, strict=True):
        if 32 < s < 65536:
            assert r / 8 / 20 <= s < 2 * r / 8 / 20
    # A link given by loss follows its modelled rate.
    near = Link(peer="B", url="https://b", loss_db=0).block_size
    far = Link(peer="B", url="https://b", loss_db=22).block_size
    assert near > far
    assert Link(peer="B", url="https://b", key_rate_bps=1e9, block_bytes=64).block_size == 64


def test_config_is_immutable(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE))
    with pytest.raises(ValidationError):
        cfg.kme_id = "KME_Z"  # type: ignore[misc]
    assert isinstance(cfg, KmeConfig)
