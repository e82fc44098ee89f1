"""apps.keysmoke against in-process KMEs (tests/harness.py): success, mismatch, timeouts."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from apps import keysmoke
from keyclient import Etsi014Client, Key
from qgw.pki import Pki
from qgw.secret import Secret
from tests.harness import KmePair, free_port


def _argv(kmes: KmePair, pki: Pki, *extra: str) -> list[str]:
    return ["--master-kme", kmes.url("KME_A"), "--slave-kme", kmes.url("KME_B"),
            "--pki", str(pki.root), "--master", "SAE_1", "--slave", "SAE_2", *extra]


def test_keys_match_and_are_never_printed(kmes: KmePair, pki: Pki,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    real = Etsi014Client.get_keys_with_ids

    def spy(self: Etsi014Client, master: str, key_ids: list[str]) -> list[Key]:
        keys = real(self, master, key_ids)
        seen.extend(k.secret.expose() for k in keys)
        return keys

    monkeypatch.setattr(Etsi014Client, "get_keys_with_ids", spy)
    assert keysmoke.main(_argv(kmes, pki, "--count", "4", "--timeout", "10")) == 0
    out = capsys.readouterr()
    assert "OK: 4/4 keys matched" in out.out
    assert out.out.count("key_ID ") == 4
    assert len(seen) == 4
    for material in seen:
        for shown in (base64.b64encode(material).decode(), material.hex()):
            assert shown not in out.out + out.err


def test_mismatch_fails(kmes: KmePair, pki: Pki, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = Etsi014Client.get_keys_with_ids

    def corrupt(self: Etsi014Client, master: str, key_ids: list[str]) -> list[Key]:
        keys = real(self, master, key_ids)
        first = keys[0]
        flipped = bytes([first.secret.expose()[0] ^ 1]) + first.secret.expose()[1:]
        return [Key(first.key_id, Secret(flipped)), *keys[1:]]

    monkeypatch.setattr(Etsi014Client, "get_keys_with_ids", corrupt)
    assert keysmoke.main(_argv(kmes, pki, "--count", "3")) == keysmoke.EXIT_FAILED
    out = capsys.readouterr()
    assert "MISMATCH key_ID" in out.out
    assert "only 2/3 keys matched" in out.err


def test_unreachable_kme_times_out(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    argv = ["--master-kme", f"https://localhost:{port}", "--slave-kme",
            f"https://localhost:{port}", "--pki", str(pki.root), "--timeout", "0.5"]
    assert keysmoke.main(argv) == keysmoke.EXIT_NOT_READY
    out = capsys.readouterr()
    assert "waiting" in out.out
    assert "not ready" in out.err and "connection refused" in out.err


def test_missing_pki_is_a_usage_error(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--pki", str(tmp_path / "nope"), "--timeout", "1"]
    assert keysmoke.main(argv) == keysmoke.EXIT_USAGE
    assert "run `qgw pki init`" in capsys.readouterr().err


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit) as exc:
        keysmoke.parse_args(["--master", "SAE_1", "--slave", "SAE_1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        keysmoke.parse_args(["--count", "0"])
    opts = keysmoke.parse_args(["--count", "5", "--timeout", "2.5"])
    assert (opts.count, opts.timeout, opts.master, opts.slave) == (5, 2.5, "SAE_1", "SAE_2")
