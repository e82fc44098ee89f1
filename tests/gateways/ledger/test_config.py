"""Ledger gateway configuration: the documented examples load, mistakes name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateways.ledger import config as ledger_config
from gateways.ledger.config import load
from gateways.ledger.state import Deployment, load_or_create_account
from qgw.errors import ConfigError, PkiError


def examples() -> dict[str, dict[str, Any]]:
    doc = ledger_config.__doc__ or ""
    blocks = re.findall(r"\n\n((?:    .*\n)+)", doc)
    found = [yaml.safe_load("\n".join(line[4:] for line in b.splitlines())) for b in blocks
             if "role:" in b]
    return {example["role"]: example for example in found}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "conf" / "ledger.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_documented_examples_load(tmp_path: Path) -> None:
    docs = examples()
    assert set(docs) == {"writer", "reader"}
    w = load(write(tmp_path, docs["writer"]))
    assert w.role == "writer" and w.key_api == "004" and w.peer_sae == "SAE_2"
    assert w.writer is not None and w.writer.mqtt is not None and w.writer.rest is not None
    assert w.writer.mqtt.prefix == "qkdgw/sensors" and w.writer.rest.port == 8080
    assert w.writer.batch.max_records == 1000 and w.writer.batch.interval_s == 1.0
    assert w.writer.keys.records_per_key == 100 and w.writer.keys.max_key_age_s == 60
    assert w.ledger.url == "http://anvil:8545" and w.ledger.contract is None
    assert w.ledger.fund_wei == 10**18
    assert w.account_file == Path("/state/ledger-writer/account.key")
    assert w.contract_file == Path("/state/ledger-writer/contract.json")
    r = load(write(tmp_path, docs["reader"]))
    assert r.role == "reader" and r.reader is not None and r.account is None
    assert r.reader.writers == ["0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"]
    assert r.reader.out == Path("/state/ledger-reader/readings.jsonl")
    assert r.contract_file == Path("/shared/contract.json")


@pytest.mark.parametrize("role, change, field", [
    ("writer", {"colour": "red"}, "colour"),
    ("writer", {"role": "auditor"}, "role"),
    ("writer", {"key_api": "015"}, "key_api"),
    ("writer", {"kme": "http://kme-a:8443"}, "kme"),
    ("writer", {"ledger": {"url": "ftp://anvil"}}, "ledger.url"),
    ("writer", {"ledger": {"contract": "0x1234"}}, "ledger.contract"),
    ("writer", {"ledger": {"fund_wei": -1}}, "ledger.fund_wei"),
    ("writer", {"writer": {"devices": {"count": 1}, "rest": {"port": 70000}}},
     "writer.rest.port"),
    ("writer", {"writer": {"devices": {"count": 1}, "rest": {"port": 1},
                           "batch": {"max_records": 0}}}, "writer.batch.max_records"),
    ("writer", {"writer": {"devices": {"count": 1}, "rest": {"port": 1},
                           "keys": {"records_per_key": 0}}}, "writer.keys.records_per_key"),
    ("writer", {"writer": {"devices": {"count": 1}, "mqtt": {"host": "m", "prefix": "a/#"}}},
     "writer.mqtt.prefix"),
    ("writer", {"writer": {"devices": {"count": 1}, "rest": {"port": 1}, "batch": {"colour": 1}}},
     "writer.batch.colour"),
    # a mistyped EIP-55 checksum is a mistyped address
    ("reader", {"reader": {"writers": ["0xF39Fd6e51aad88F6F4ce6aB8827279cffFb92266"],
                           "out": "o.jsonl"}}, "reader.writers"),
    ("reader", {"reader": {"writers": [], "out": "o.jsonl"}}, "reader.writers"),
])
def test_mistakes_name_the_field(tmp_path: Path, role: str, change: dict[str, Any],
                                 field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, examples()[role] | change))
    assert err.value.field is not None and err.value.field.startswith(field), err.value
    assert "ledger.yaml" in str(err.value)


@pytest.mark.parametrize("role, change, message", [
    ("writer", {"writer": {"devices": {"count": 3}}}, "mqtt, rest or both"),
    ("writer", {"writer": {"devices": {}, "rest": {"port": 1}}}, "lets no sensor in"),
    ("writer", {"writer": None}, "a writer has a writer section"),
    ("writer", {"peer_sae": "SAE_1"}, "own SAE"),
    ("reader", {"account": "key.hex"}, "a reader signs nothing"),
    ("reader", {"ledger": {"url": "http://anvil:8545"}}, "ledger.contract or ledger.contract_file"),
    ("reader", {"ledger": {"url": "eth-tester", "contract_file": "c.json", "fund_wei": 1}},
     "remove ledger.fund_wei"),
])
def test_inconsistent_shapes(tmp_path: Path, role: str, change: dict[str, Any],
                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, examples()[role] | change))


def test_relative_paths_and_environment_overrides(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, examples()["reader"] | {
        "state": "state", "pki": "pki", "ledger": {"contract_file": "../shared/c.json"},
        "reader": {"writers": ["0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"], "out": "o.jsonl"}})
    cfg = load(path)
    assert cfg.state == path.parent / "state" and cfg.pki == path.parent / "pki"
    assert cfg.contract_file == path.parent / "../shared/c.json"
    assert cfg.reader is not None and cfg.reader.out == path.parent / "o.jsonl"
    # all lower case is a valid address too; it is kept in checksum form
    assert cfg.reader.writers == ["0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"]
    monkeypatch.setenv("QGW_LEDGER__LEDGER__URL", "http://127.0.0.1:8545")
    monkeypatch.setenv("QGW_LEDGER__READER__POLL_S", "0.25")
    cfg = load(path)
    assert cfg.ledger.url == "http://127.0.0.1:8545"
    assert cfg.reader is not None and cfg.reader.poll_s == 0.25


def test_account_key_is_created_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "account.key"
    created = load_or_create_account(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_account(path).address == created.address
    path.chmod(0o644)
    with pytest.raises(PkiError, match="readable by others"):
        load_or_create_account(path)
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(ConfigError) as err:
        load_or_create_account(path)
    assert "not a key" not in str(err.value)   # a key file's content is never quoted


def test_contract_file_round_trips_and_names_itself_when_broken(tmp_path: Path) -> None:
    path = tmp_path / "contract.json"
    deployment = Deployment("0x5fbdb2315678afecb367f032d93f642f64180aa3", 31337, 1,
                            "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266")
    deployment.save(path)
    loaded = Deployment.load(path)
    assert loaded.address == "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    assert (loaded.chain_id, loaded.block) == (31337, 1)
    path.write_text('{"address": "0x12"}')
    with pytest.raises(ConfigError, match=r"contract\.json: not a contract file"):
        Deployment.load(path)
