"""WebrtcConfig: the documented example loads, and a wrong shape is refused clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateways.webrtc.config import WebrtcConfig, load
from gateways.webrtc.sframe import CipherSuite

MASTER: dict[str, Any] = {
    "role": "master", "sae": "SAE_A", "pki": "pki", "kme": "https://kme-a:8443",
    "peer": {"sae": "SAE_B", "control": "gw-b:7301"},
    "call": {"signal": "http://videocall:8090", "room": "quantum", "name": "camera"},
}
SLAVE: dict[str, Any] = {
    **MASTER, "role": "slave", "sae": "SAE_B", "peer": {"sae": "SAE_A"},
    "control_listen": {"host": "0.0.0.0", "port": 7301},
    "call": {"signal": "https://call.example:8443", "name": "viewer"}, "media": "browser",
}


def test_defaults_follow_the_trial_and_paths_resolve(tmp_path: Path) -> None:
    path = tmp_path / "webrtc.yaml"
    path.write_text(yaml.safe_dump(MASTER))
    cfg = load(path)
    assert cfg.key_api == "004" and cfg.media == "aiortc"
    assert cfg.cipher_suite is CipherSuite.AES_256_GCM_SHA512_128
    assert cfg.keys.rekey_interval_s == 10.0
    assert cfg.pki == tmp_path / "pki"
    assert cfg.control_connect == ("gw-b", 7301)


def test_browser_participant_page_origin_is_the_call_server() -> None:
    cfg = WebrtcConfig.model_validate(SLAVE)
    assert cfg.page_origins == ["https://call.example:8443"]
    assert cfg.call.room == "quantum" and cfg.control_connect is None
    assert WebrtcConfig.model_validate(
        {**SLAVE, "handoff": {"origins": ["http://localhost:8090"]}}).page_origins == \
        ["http://localhost:8090"]


@pytest.mark.parametrize("change, message", [
    ({"control_listen": {"host": "0.0.0.0", "port": 1}}, "a master names"),
    ({"peer": {"sae": "SAE_B"}}, "a master names"),
    ({"media": "browser", "handoff": {"host": "0.0.0.0"}}, "127.0.0.1 or localhost"),
    ({"media": "browser", "handoff": {"host": "::1"}}, "127.0.0.1 or localhost"),
    ({"suite": "AES_128_CTR_HMAC_SHA256_80"}, "suite"),
    ({"call": {"signal": "http://v:1", "name": "has space"}}, "name"),
    ({"video": {"width": 641}}, "width"),
    ({"kme": "http://kme-a:8443"}, "https"),
])
def test_wrong_shapes_are_refused_with_a_clear_message(change: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WebrtcConfig.model_validate({**MASTER, **change})


def test_a_slave_needs_its_control_listener() -> None:
    with pytest.raises(ValidationError, match="a slave has control_listen"):
        WebrtcConfig.model_validate({**SLAVE, "control_listen": None})


def test_cli_names_what_is_wrong_with_a_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MASTER, "kme": "http://kme-a:8443"}))
    for path, message in ((bad, "the KME URL must start with https://"),
                          (tmp_path / "missing.yaml", "file does not exist")):
        out = subprocess.run([sys.executable, "-m", "qgw", "gateway", "webrtc", "--config",
                              str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and message in out.stdout + out.stderr, out
        assert "Traceback" not in out.stdout + out.stderr
