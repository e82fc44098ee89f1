"""The committed RecordAnchor.json is what the pinned solcjs makes of RecordAnchor.sol."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateways.ledger.contract import load_artifact, source

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "compile-contract"


def compile_contract() -> ModuleType:
    """scripts/compile-contract as a module: the test runs the very code the script does."""
    loader = importlib.machinery.SourceFileLoader("compile_contract", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return compile_contract()


@pytest.fixture(scope="module")
def fresh(script: ModuleType) -> dict[str, Any]:
    try:
        artifact: dict[str, Any] = script.compile_artifact()
    except script.ToolMissing as e:
        pytest.fail(str(e))  # not a skip: CI has the tools (scripts/tools)
    return artifact


@pytest.fixture(scope="module")
def committed(script: ModuleType) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(script.ARTIFACT.read_text())
    return loaded


def test_source_hash_matches_the_sol_file(committed: dict[str, Any]) -> None:
    assert committed["source_sha256"] == hashlib.sha256(source().encode()).hexdigest(), (
        "RecordAnchor.sol changed since RecordAnchor.json was written: "
        "run scripts/compile-contract")


def test_abi_and_bytecode_equal_a_fresh_compile(committed: dict[str, Any],
                                                fresh: dict[str, Any]) -> None:
    for field in ("abi", "bytecode", "deployedBytecode", "compiler", "evmVersion",
                  "optimizer", "metadata"):
        assert committed[field] == fresh[field], (
            f"RecordAnchor.json: {field} differs from a fresh compile: "
            "run scripts/compile-contract")


def test_check_mode_agrees(script: ModuleType, fresh: dict[str, Any],
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(script, "compile_artifact", lambda: fresh)
    monkeypatch.setattr(sys, "argv", ["compile-contract", "--check"])
    assert script.main() == 0, capsys.readouterr().err

    stale = {**fresh, "bytecode": fresh["bytecode"] + "00"}
    monkeypatch.setattr(script, "compile_artifact", lambda: stale)
    assert script.main() == 1
    assert "bytecode differ" in capsys.readouterr().err


def test_missing_tools_say_how_to_get_them(script: ModuleType, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(script, "SOLCJS", tmp_path / "solcjs")
    with pytest.raises(script.ToolMissing, match="run scripts/tools"):
        script.compile_artifact()


def test_the_package_loads_the_artifact(committed: dict[str, Any]) -> None:
    artifact = load_artifact()
    assert artifact.contract == "RecordAnchor"
    assert artifact.deployed_bytecode.hex() == committed["deployedBytecode"][2:]
    names = {entry.get("name") for entry in artifact.abi}
    assert {"anchor", "anchoredAt", "batches", "setWriter", "writers", "Anchored"} <= names
