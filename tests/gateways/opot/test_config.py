"""OPoT node configuration: the documented examples load, every inconsistency is refused with
a message that says what to fix, mistakes name file and field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gateways.opot import config as opot_config
from gateways.opot.config import OpotConfig, load
from qgw.cli import app
from qgw.errors import ConfigError


def doc_blocks() -> list[dict[str, Any]]:
    """The indented YAML blocks of the module docstring: a transit node, the egress's part."""
    doc = opot_config.__doc__ or ""
    blocks = re.findall(r"\n\n((?:    .*\n)+)", doc)
    return [yaml.safe_load("\n".join(line[4:] for line in b.splitlines())) for b in blocks]


def transit() -> dict[str, Any]:
    node, _ = doc_blocks()
    return copy.deepcopy(node)


def ingress() -> dict[str, Any]:
    """The transit example moved to the head of the path: no upstream link."""
    cfg = transit() | {"role": "ingress", "node": "INGRESS", "sae": "SAE_INGRESS",
                       "kme": "https://kme-a:8443",
                       "downstream": {"sae": "SAE_SF1", "connect": "sf1:7201"}}
    del cfg["upstream"]
    return cfg


def egress() -> dict[str, Any]:
    """The transit example at the tail, with the docstring's controller instead of
    controller_sae / profiles_listen, and no downstream link."""
    _, part = doc_blocks()
    cfg = transit() | {"role": "egress", "node": "EGRESS", "sae": "SAE_EGRESS",
                       "upstream": {"sae": "SAE_SF2",
                                    "listen": {"host": "0.0.0.0", "port": 7201}}} | part
    for key in ("downstream", "controller_sae", "profiles_listen"):
        del cfg[key]
    return cfg


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "conf" / "opot.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_documented_examples_load(tmp_path: Path) -> None:
    sf1 = load(write(tmp_path, transit()))
    assert (sf1.role, sf1.node, sf1.sae) == ("transit", "SF1", "SAE_SF1")
    assert sf1.path.nodes == ["INGRESS", "SF1", "SF2", "EGRESS"] and sf1.path.spi == 42
    assert sf1.pki == Path("/state/pki") and sf1.kme == "https://kme-b:8443"
    assert (sf1.interfaces.left, sf1.interfaces.right) == ("left", "right")
    assert sf1.keys.rekey_interval_s == 60
    assert sf1.upstream is not None and sf1.upstream.listen.port == 7201
    assert sf1.downstream is not None and sf1.downstream.connect == "sf2:7201"
    assert sf1.controller_sae == "SAE_EGRESS" and sf1.controller is None
    assert sf1.profiles_listen is not None and sf1.profiles_listen.port == 7301
    assert sf1.metrics is not None and sf1.metrics.port == 9700

    head = load(write(tmp_path, ingress()))
    assert head.role == "ingress" and head.upstream is None and head.downstream is not None

    tail = load(write(tmp_path, egress()))
    assert tail.role == "egress" and tail.downstream is None and tail.controller_sae is None
    assert tail.controller is not None
    assert (tail.controller.rotate_s, tail.controller.overlap_s) == (60, 2)
    assert [(n.node, n.sae, n.address) for n in tail.controller.nodes] == [
        ("INGRESS", "SAE_INGRESS", "ingress:7301"), ("SF1", "SAE_SF1", "sf1:7301"),
        ("SF2", "SAE_SF2", "sf2:7301")]


def _without(cfg: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in keys}


INCONSISTENT: list[tuple[str, dict[str, Any], str]] = [
    # role against the node's position in path.nodes
    ("transit", {"role": "ingress"}, "position 2 of the path, so its role is transit, "
                                     "not ingress"),
    ("transit", {"role": "egress"}, "role is transit, not egress"),
    ("ingress", {"role": "transit"}, "position 1 of the path, so its role is ingress"),
    ("egress", {"role": "transit"}, "position 4 of the path, so its role is egress"),
    # links
    ("transit", {"upstream": None}, "every node but the ingress has an upstream link"),
    ("egress", {"upstream": None}, "every node but the ingress has an upstream link"),
    ("ingress", {"upstream": {"sae": "SAE_X", "listen": {"port": 7201}}},
     "every node but the ingress has an upstream link"),
    ("transit", {"downstream": None}, "every node but the egress has a downstream link"),
    ("egress", {"downstream": {"sae": "SAE_X", "connect": "x:7201"}},
     "every node but the egress has a downstream link"),
    # the controller lives on the egress, and only there
    ("egress", {"controller": None}, "the egress is the chain's controller"),
    ("transit", {"controller_sae": None}, "give controller_sae and profiles_listen"),
    ("transit", {"profiles_listen": None}, "give controller_sae and profiles_listen"),
    ("ingress", {"controller_sae": None}, "give controller_sae and profiles_listen"),
    # path.nodes
    ("transit", {"path": {"id": "c", "spi": 1, "nodes": ["INGRESS", "SF1", "SF1", "EGRESS"]}},
     "path.nodes repeats a node"),
    ("transit", {"node": "SF9"}, "node 'SF9' is not in path.nodes"),
]


@pytest.mark.parametrize("base, change, message", INCONSISTENT,
                         ids=[f"{b}:{'+'.join(c)}" for b, c, _ in INCONSISTENT])
def test_inconsistent_shapes_are_refused(tmp_path: Path, base: str, change: dict[str, Any],
                                         message: str) -> None:
    cfg = {"ingress": ingress, "transit": transit, "egress": egress}[base]()
    cfg = _without(cfg | change, *[k for k, v in change.items() if v is None])
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load(write(tmp_path, cfg))
    assert "opot.yaml" in str(err.value)


@pytest.mark.parametrize("nodes", [
    [{"node": "INGRESS", "sae": "SAE_INGRESS", "address": "ingress:7301"},
     {"node": "SF1", "sae": "SAE_SF1", "address": "sf1:7301"}],               # SF2 missing
    [{"node": "INGRESS", "sae": "SAE_INGRESS", "address": "ingress:7301"},
     {"node": "SF1", "sae": "SAE_SF1", "address": "sf1:7301"},
     {"node": "SF2", "sae": "SAE_SF2", "address": "sf2:7301"},
     {"node": "EGRESS", "sae": "SAE_EGRESS", "address": "egress:7301"}],      # itself
    [{"node": "INGRESS", "sae": "SAE_INGRESS", "address": "ingress:7301"},
     {"node": "SF1", "sae": "SAE_SF1", "address": "sf1:7301"},
     {"node": "SF3", "sae": "SAE_SF3", "address": "sf3:7301"}],               # not on the path
], ids=["missing", "egress-itself", "stranger"])
def test_controller_must_cover_the_path(tmp_path: Path, nodes: list[dict[str, str]]) -> None:
    cfg = egress()
    cfg["controller"] = cfg["controller"] | {"nodes": nodes}
    with pytest.raises(ConfigError, match=re.escape("controller.nodes must list every node "
                                                    "but the egress")):
        load(write(tmp_path, cfg))


@pytest.mark.parametrize("base, change, field", [
    ("transit", {"colour": "red"}, "colour"),
    ("transit", {"role": "relay"}, "role"),
    ("transit", {"kme": "http://kme-b:8443"}, "kme"),
    ("transit", {"path": {"id": "chain1", "spi": 1 << 24, "nodes": ["INGRESS", "SF1"]}},
     "path.spi"),
    ("transit", {"path": {"id": "chain1", "spi": -1, "nodes": ["INGRESS", "SF1"]}}, "path.spi"),
    ("transit", {"path": {"id": "chain 1", "spi": 42, "nodes": ["INGRESS", "SF1"]}}, "path.id"),
    ("transit", {"path": {"id": "chain1", "spi": 42, "nodes": ["SF1"]}}, "path.nodes"),
    ("transit", {"path": {"id": "chain1", "spi": 42, "nodes": ["INGRESS", "SF1"],
                          "shuffle": True}}, "path.shuffle"),
    ("transit", {"interfaces": {"left": "x" * 16, "right": "right"}}, "interfaces.left"),
    ("transit", {"interfaces": {"left": "left", "right": ""}}, "interfaces.right"),
    ("transit", {"interfaces": {"left": "left"}}, "interfaces.right"),
    ("transit", {"downstream": {"sae": "SAE_SF2", "connect": "sf2"}}, "downstream.connect"),
    ("transit", {"downstream": {"sae": "SAE_SF2", "connect": "sf2:70000"}},
     "downstream.connect"),
    ("transit", {"downstream": {"sae": "SAE_SF2", "connect": ":7201"}}, "downstream.connect"),
    ("transit", {"upstream": {"sae": "SAE_INGRESS", "listen": {"port": 65536}}},
     "upstream.listen.port"),
    ("transit", {"profiles_listen": {"port": 7301, "hots": "0.0.0.0"}}, "profiles_listen.hots"),
    ("transit", {"keys": {"rekey_interval_s": "soon"}}, "keys.rekey_interval_s"),
    ("egress", {"controller": {"rotate_s": 0, "nodes": []}}, "controller.rotate_s"),
    ("egress", {"controller": {"nodes": [{"node": "INGRESS", "sae": "SAE_INGRESS",
                                          "address": "ingress"}]}},
     "controller.nodes.0.address"),
])
def test_bad_values_name_the_field(tmp_path: Path, base: str, change: dict[str, Any],
                                   field: str) -> None:
    cfg = {"transit": transit, "egress": egress}[base]() | change
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, cfg))
    assert err.value.field is not None and err.value.field.startswith(field), err.value
    assert "opot.yaml" in str(err.value)


def test_unknown_field_says_to_check_the_spelling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field") as err:
        load(write(tmp_path, transit() | {"controler_sae": "SAE_EGRESS"}))
    assert err.value.field == "controler_sae"


def test_relative_pki_and_environment_overrides(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, transit() | {"pki": "pki"})
    assert load(path).pki == path.parent / "pki"
    monkeypatch.setenv("QGW_OPOT__INTERFACES__LEFT", "eth1")
    monkeypatch.setenv("QGW_OPOT__INTERFACES__RIGHT", "eth2")
    monkeypatch.setenv("QGW_OPOT__PATH__SPI", "7")
    cfg = load(path)
    assert (cfg.interfaces.left, cfg.interfaces.right, cfg.path.spi) == ("eth1", "eth2", 7)
    monkeypatch.setenv("QGW_OPOT__INTERFACES__LEFT", "x" * 16)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.field == "interfaces.left"


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["gateway", "opot", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1, res.output
    assert "missing.yaml" in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["gateway", "opot", "--config",
                              str(write(tmp_path, transit() | {"role": "egress"}))])
    assert res.exit_code == 1 and "error:" in res.output, res.output
    assert "role is transit" in res.output and "Traceback" not in res.output


def test_model_is_frozen() -> None:
    cfg = OpotConfig.model_validate(transit())
    with pytest.raises(Exception, match="frozen"):
        cfg.node = "SF2"  # type: ignore[misc]


def test_profile_overlap_must_end_before_the_next_rotation(tmp_path: Path) -> None:
    cfg = egress()
    cfg["controller"] = cfg["controller"] | {"rotate_s": 5, "overlap_s": 5}
    with pytest.raises(ConfigError, match=re.escape("controller.overlap_s (5.0) must be shorter "
                                                    "than controller.rotate_s (5.0)")):
        load(write(tmp_path, cfg))
