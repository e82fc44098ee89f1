"""The OPoT gateway end to end: KMEs key the links, the egress's controller rotates profiles,
real packets cross a chain of namespaces and every one is verified."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateways.opot.demo import RECEIVER, SENDER
from gateways.opot.lab import NODES, PY, SERVER_IP, OpotLab
from qgw.netlab import Lab


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_chain_verifies_every_packet_through_rotations_and_rekeys(lab: Lab,
                                                                   tmp_path: Path) -> None:
    o = OpotLab(lab, tmp_path, keys={"rekey_interval_s": 1, "overlap_s": 1},
                rotate_s=2, overlap_s=1)
    o.start()
    o.wait_ready()
    rotations = o.metric("EGRESS", "qgw_opot_rotations_total")
    rekeys = o.metric("INGRESS", "qgw_session_rekeys_total")
    lab.start("receiver", [PY, "-c", RECEIVER], env=None, ns_of="server")
    time.sleep(1.0)
    sent = o.run("client", [PY, "-c", SENDER, "3000", "400"], 60)
    assert sent.returncode == 0, sent.stderr
    lab.procs["receiver"].wait(timeout=20)
    got = json.loads(lab.tail("receiver").strip().splitlines()[-1])
    assert got == {"n": 3000, "distinct": 3000, "max": 2999}, got
    assert o.metric("EGRESS", "qgw_opot_rejected_total") == 0
    assert o.metric("EGRESS", "qgw_opot_verified_total") >= 3000
    assert o.metric("EGRESS", "qgw_opot_rotations_total") - rotations >= 3
    assert o.metric("INGRESS", "qgw_session_rekeys_total") - rekeys >= 5
    for node in NODES[1:3]:
        assert o.metric(node, "qgw_session_rekeys_total") > 0   # both links of each SF


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_a_restarted_service_function_gets_its_share_and_keys_again(lab: Lab,
                                                                     tmp_path: Path) -> None:
    o = OpotLab(lab, tmp_path, keys={"rekey_interval_s": 30}, rotate_s=60)
    o.start()
    o.wait_ready()
    lab.kill("sf1")
    time.sleep(1)
    assert o.run("client", [PY, "-c", f"import socket; socket.create_connection(("
                                      f"{SERVER_IP!r}, 8000), timeout=1)"], 10).returncode != 0
    o.start_node("SF1")                      # it comes back with no share and no link keys
    o.wait_ready()
    assert o.metric("SF1", "qgw_opot_profiles") == 1
