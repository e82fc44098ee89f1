"""AsyncKeySession: a KeySession for asyncio gateways, over the TLS control channel."""

from __future__ import annotations

import asyncio

from keyclient.aio import AsyncKeySession
from keyclient.control import TlsControlChannel
from keyclient.installer import SessionKey
from keyclient.policy import SessionPolicy
from keyclient.session import SessionState
from tests.harness import KmePair


class AsyncInstaller:
    """An installer with coroutine methods, checking they run on the gateway's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.keys: dict[int, SessionKey] = {}
        self.active: int | None = None

    async def install(self, epoch: int, key: SessionKey) -> None:
        assert asyncio.get_running_loop() is self.loop
        await asyncio.sleep(0)
        self.keys[epoch] = key

    async def activate(self, epoch: int) -> None:
        assert epoch in self.keys
        self.active = epoch

    def retire(self, epoch: int) -> None:  # plain functions work too
        self.keys.pop(epoch, None)

    async def invalidate(self, reason: str) -> None:
        self.active = None


def test_async_sessions_agree_over_tls(kmes: KmePair) -> None:
    async def main() -> None:
        pol = SessionPolicy(rekey_interval_s=0.3, overlap_s=0.1)
        listen = TlsControlChannel(kmes.pki.sae_files("SAE_2"), "SAE_1",
                                   listen=("127.0.0.1", 0))
        mi, si = AsyncInstaller(), AsyncInstaller()
        slave = AsyncKeySession("slave", kme=kmes.client("SAE_2"), local_sae="SAE_2",
                                peer_sae="SAE_1", channel=listen, installer=si, policy=pol)
        await slave.start()
        connect = TlsControlChannel(kmes.pki.sae_files("SAE_1"), "SAE_2",
                                    connect=("127.0.0.1", listen.port or 0))
        master = AsyncKeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1",
                                 peer_sae="SAE_2", channel=connect, installer=mi, policy=pol)
        await master.start()
        try:
            st = await master.wait_protected(timeout_s=10)
            assert st.state is SessionState.PROTECTED
            st = await master.wait_for(lambda s: s.rekeys >= 4, timeout_s=10)
            await slave.wait_for(lambda s: s.epoch == st.epoch, timeout_s=5)
            assert si.active == mi.active == st.epoch
            assert mi.keys[st.epoch].secret == si.keys[st.epoch].secret  # type: ignore[index]
        finally:
            await master.stop()
            await slave.stop()
        assert master.status().state is SessionState.STOPPED

    asyncio.run(main())
