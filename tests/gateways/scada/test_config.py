"""SCADA gateway configuration: the documented examples load, mistakes name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gateways.scada import config as scada_config
from gateways.scada.config import ScadaConfig, load
from qgw.cli import app
from qgw.errors import ConfigError


def examples() -> list[dict[str, Any]]:
    doc = scada_config.__doc__ or ""
    blocks = re.findall(r"\n\n((?:    .*\n)+)", doc)
    return [yaml.safe_load("\n".join(line[4:] for line in b.splitlines())) for b in blocks
            if "role:" in b]


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "conf" / "scada.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_documented_examples_load(tmp_path: Path) -> None:
    cc, sub = examples()
    a = load(write(tmp_path, cc))
    assert a.role == "control-centre" and a.substations[0].pair == 1
    assert a.pki == Path("/state/pki") and a.keys.rekey_interval_s == 60
    b = load(write(tmp_path, sub))
    assert b.control_centre is not None and b.control_centre.control_listen.port == 7101
    assert b.modbus is not None and b.modbus.inbound[1].functions == [5, 15]


@pytest.mark.parametrize("change, field", [
    ({"colour": "red"}, "colour"),
    ({"role": "hub"}, "role"),
    ({"kme": "http://kme-a:8443"}, "kme"),
    ({"tun": {"address": "not-an-address"}}, "tun.address"),
    ({"tun": {"address": "10.0.0.1/24", "name": "x" * 16}}, "tun.name"),
    ({"listen": {"port": 70000}}, "listen.port"),
    ({"keys": {"mode": "maybe"}}, "keys.mode"),
])
def test_mistakes_name_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    cc = examples()[0] | change
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, cc))
    assert err.value.field is not None and err.value.field.startswith(field), err.value
    assert "scada.yaml" in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"substations": []}, "lists its substations"),
    ({"substations": [{"pair": 1, "sae": "A", "control": "h:1", "routes": []},
                      {"pair": 1, "sae": "B", "control": "h:2", "routes": []}]}, "same pair"),
    ({"substations": [{"pair": 1, "sae": "A", "control": "no-port", "routes": []}]},
     "HOST:PORT"),
    ({"role": "substation"}, "control_centre section"),
])
def test_inconsistent_shapes(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, examples()[0] | change))


def test_relative_pki_and_environment_override(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, examples()[0] | {"pki": "pki"})
    assert load(path).pki == path.parent / "pki"
    monkeypatch.setenv("QGW_SCADA__LISTEN__PORT", "51999")
    assert load(path).listen.port == 51999


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["gateway", "scada", "--config", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "does not exist" in res.output
    res = runner.invoke(app, ["gateway", "scada", "--config",
                              str(write(tmp_path, {"role": "substation"}))])
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output


def test_model_is_frozen() -> None:
    cfg = ScadaConfig.model_validate(examples()[1])
    with pytest.raises(Exception, match="frozen"):
        cfg.sae = "x"  # type: ignore[misc]
