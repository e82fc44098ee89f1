"""The RecordAnchor contract: its Solidity source and the committed compiler output.

RecordAnchor.json is written by scripts/compile-contract (pinned solcjs, reproducible
settings) and checked against a fresh compile by tests, so the product never needs a
compiler at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

ARTIFACT_FILE = "RecordAnchor.json"
SOURCE_FILE = "RecordAnchor.sol"


@dataclass(frozen=True)
class Artifact:
    contract: str
    compiler: str               # solc's full version string
    evm_version: str
    optimizer: dict[str, Any]
    source_sha256: str          # of RecordAnchor.sol, so a stale artifact is noticed
    abi: list[dict[str, Any]]
    bytecode: bytes             # creation code, what a deployment sends
    deployed_bytecode: bytes    # runtime code, what a deployed contract must hold


def load_artifact() -> Artifact:
    raw = json.loads(files(__package__).joinpath(ARTIFACT_FILE).read_text())
    return Artifact(
        contract=raw["contract"],
        compiler=raw["compiler"],
        evm_version=raw["evmVersion"],
        optimizer=raw["optimizer"],
        source_sha256=raw["source_sha256"],
        abi=raw["abi"],
        bytecode=bytes.fromhex(raw["bytecode"].removeprefix("0x")),
        deployed_bytecode=bytes.fromhex(raw["deployedBytecode"].removeprefix("0x")),
    )


def source() -> str:
    return files(__package__).joinpath(SOURCE_FILE).read_text()
