"""The egress's profile controller against real node roles over in-process channels.

The channels stand in for the mutual-TLS control channel only (its own tests cover it);
the nodes' ProfileReceiver and roles, the Controller and the Egress are the product's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from gateways.opot import gateway as opot_gateway
from gateways.opot.config import ControllerCfg
from gateways.opot.gateway import ProfileController, ProfileReceiver
from gateways.opot.pot import Egress, Ingress, Transit
from keyclient.control import ChannelDown, Message
from qgw.secret import Secret

NODES = ["INGRESS", "SF1", "SF2", "EGRESS"]


@dataclass
class Key:
    secret: Secret


class Kme:
    """Hands out fresh 256-bit randomness, as the egress's KME would."""

    def __init__(self) -> None:
        self.served = 0

    def get_keys(self, peer: str, number: int, size: int) -> list[Key]:
        self.served += 1
        return [Key(Secret(os.urandom(size // 8)))]


class Channel:
    """Controller <-> one node: a send from the controller reaches the node's receiver, the
    node's reply reaches the controller. `down` makes the controller's sends fail."""

    def __init__(self, node: str, role: Ingress | Transit, controller: ProfileController) -> None:
        self.node = node
        self.controller = controller
        self.up = True
        self.down = False
        self.receiver = object.__new__(ProfileReceiver)
        self.receiver.role = role
        self.receiver.channel = self  # type: ignore[assignment]
        self._in_node = False

    def send(self, msg: Message) -> None:
        if self._in_node:                      # the node answering the controller
            self.controller._on_message(self.node, msg)
            return
        if self.down:
            raise ChannelDown(f"{self.node} unreachable")
        self._in_node = True
        try:
            self.receiver._on_message(msg)
        finally:
            self._in_node = False

    def close(self) -> None:
        pass


@pytest.fixture
def chain(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(opot_gateway, "ACK_TIMEOUT_S", 0.2)
    roles: dict[str, Ingress | Transit] = {
        "INGRESS": Ingress("INGRESS", ordered=False),
        "SF1": Transit("SF1", ordered=False),
        "SF2": Transit("SF2", ordered=False),
    }
    egress = Egress("EGRESS", ordered=False)
    ctl = ProfileController(ControllerCfg(rotate_s=60, overlap_s=0, nodes=[]), "chain1", NODES,
                            None, Kme(), "SAE_SF2", egress)  # type: ignore[arg-type]
    ctl.channels = {n: Channel(n, r, ctl) for n, r in roles.items()}  # type: ignore[misc]

    class Chain:
        controller = ctl

        def __init__(self) -> None:
            self.roles = roles
            self.egress = egress

        def channel(self, node: str) -> Channel:
            return ctl.channels[node]  # type: ignore[return-value]

        def proves(self) -> bool:
            """A packet stamped now at the ingress verifies at the egress."""
            proof = roles["INGRESS"].start()
            for sf in ("SF1", "SF2"):
                proof = roles[sf].forward(proof)
            self.egress.verify(proof)
            return True

    return Chain()


def test_rotations_alternate_indices_and_every_packet_verifies(chain: Any) -> None:
    indices = []
    for _ in range(4):
        indices.append(chain.controller.rotate().index)
        assert chain.proves()
    assert indices == [0, 1, 0, 1]
    assert chain.controller.rotations == 4


@pytest.mark.parametrize("failing", ["SF2", "INGRESS"])
def test_a_rotation_that_fails_midway_is_taken_back_and_the_next_one_lands(
        chain: Any, failing: str) -> None:
    first = chain.controller.rotate()
    chain.channel(failing).down = True
    with pytest.raises(ChannelDown):
        chain.controller.rotate()
    # The chain goes on under the profile that was live; the half-pushed one is gone.
    assert chain.controller.current is first
    assert chain.proves()
    assert all(role.profiles == [first.index] for role in chain.roles.values())
    chain.channel(failing).down = False
    # Before the fix every later rotation was refused ("profile index in use"), for good.
    again = [chain.controller.rotate() for _ in range(3)]
    assert [p.index for p in again] == [first.index ^ 1, first.index, first.index ^ 1]
    assert chain.proves()
    assert chain.controller.rotations == 4


def test_a_node_that_refuses_a_profile_fails_the_rotation_without_wedging(chain: Any) -> None:
    chain.controller.rotate()
    # SF1 still holds index 1 from somewhere (a lost retire): it refuses the push...
    stale = chain.controller.controller.make_profile(NODES, os.urandom(32), index=1,
                                                     path="chain1")
    chain.roles["SF1"].install(stale.node("SF1"))
    with pytest.raises(TimeoutError, match="SF1 refused profile 1"):
        chain.controller.rotate()
    # ...and the retire that takes the failed rotation back clears it, so the retry lands.
    assert chain.controller.rotate().index == 1
    assert chain.proves()
