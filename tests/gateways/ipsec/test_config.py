"""IPsec gateway configuration: the documented examples load, mistakes name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gateways.ipsec import config as ipsec_config
from gateways.ipsec.config import load
from qgw.cli import app
from qgw.errors import ConfigError


def examples() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = ipsec_config.__doc__ or ""
    block = re.findall(r"\n\n((?:    .*\n)+)", doc)[0]
    master = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))
    slave = master | {"role": "slave", "sae": "SAE_B", "kme": "https://kme-b:8443",
                      "local": "192.0.2.2", "local_subnets": ["10.2.0.0/24"],
                      "peer": {"sae": "SAE_A", "address": "192.0.2.1",
                               "subnets": ["10.1.0.0/24"]},
                      "control_listen": {"host": "0.0.0.0", "port": 7201}}
    return master, slave


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "conf" / "ipsec.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_documented_examples_load(tmp_path: Path) -> None:
    master, slave = examples()
    a = load(write(tmp_path, master))
    assert a.role == "master" and a.control_connect == ("192.0.2.2", 7201)
    assert str(a.peer.subnets[0]) == "10.2.0.0/24" and a.keys.grace_s == 30
    assert a.lifetime.soft_bytes == 1_000_000_000 and a.reqid == 0x51D0
    b = load(write(tmp_path, slave))
    assert b.control_listen is not None and b.control_listen.port == 7201


@pytest.mark.parametrize("change, field", [
    ({"colour": "red"}, "colour"),
    ({"role": "hub"}, "role"),
    ({"kme": "http://kme-a:8443"}, "kme"),
    ({"local": "not-an-address"}, "local"),
    ({"local_subnets": []}, "local_subnets"),
    ({"reqid": 0}, "reqid"),
    ({"replay_window": 64}, "replay_window"),
    ({"lifetime": {"soft_bytes": 10, "hard_bytes": 5}}, "lifetime"),
    ({"keys": {"mode": "maybe"}}, "keys.mode"),
])
def test_mistakes_name_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    master, _ = examples()
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, master | change))
    assert field in str(err.value) and "ipsec.yaml" in str(err.value)


@pytest.mark.parametrize("change, words", [
    ({"peer": {"sae": "SAE_B", "address": "192.0.2.2", "subnets": ["10.2.0.0/24"]}},
     "peer.control"),
    ({"local": "2001:db8::1"}, "same IP version"),
    ({"local": "192.0.2.2"}, "same address"),
])
def test_shape_errors_are_explained(tmp_path: Path, change: dict[str, Any],
                                    words: str) -> None:
    master, _ = examples()
    with pytest.raises(ConfigError, match=re.escape(words)):
        load(write(tmp_path, master | change))


def test_slave_needs_a_control_listener(tmp_path: Path) -> None:
    _, slave = examples()
    del slave["control_listen"]
    with pytest.raises(ConfigError, match="control_listen"):
        load(write(tmp_path, slave))


def test_environment_overrides_a_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master, _ = examples()
    monkeypatch.setenv("QGW_IPSEC__PEER__ADDRESS", "192.0.2.9")
    assert str(load(write(tmp_path, master)).peer.address) == "192.0.2.9"


def test_cli_help_and_missing_file(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["gateway", "ipsec", "--help"])
    assert out.exit_code == 0 and "--config" in out.output and "ESP" in out.output
    out = runner.invoke(app, ["gateway", "ipsec", "--config", str(tmp_path / "nope.yaml")])
    assert out.exit_code != 0 and "nope.yaml" in out.output


def test_gateway_start_on_this_kernel_names_what_is_missing(tmp_path: Path) -> None:
    """This host's kernel (CI's) has no ESP: a clear error, never a raw errno."""
    from gateways.ipsec.demo import esp_missing

    master, _ = examples()
    master["pki"] = str(tmp_path / "no-pki")
    out = CliRunner().invoke(app, ["gateway", "ipsec", "--config", str(write(tmp_path, master))])
    assert out.exit_code != 0
    text = " ".join(out.output.split())
    if esp_missing() is None:   # a kernel with ESP gets as far as the missing PKI
        assert "no-pki" in text
    else:
        assert "CONFIG_INET_ESP" in text and "Errno" not in text
