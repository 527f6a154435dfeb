"""Pods leaving a pool while the router is talking to them (discovery, drains)."""

from __future__ import annotations

import asyncio

from scripted_decode import ScriptedPod

from router.pools import Pools, Role


def test_a_pod_removed_during_a_poll_ends_that_poll_quietly_and_then_closes(
        scripted_pod: ScriptedPod) -> None:
    # A discovery round that drops a pod while GetLoad is on the wire used to close the
    # channel under the call: the poll raised CancelledError, GET /pools answered 500 and
    # the background poller died with it.
    scripted_pod.script.load_delay = 0.5

    async def scenario() -> None:
        pools = Pools.connect([scripted_pod.address], [], poll_interval=0.05)
        pod = pools.decode[0]
        await pools.start()  # the first, slow, poll
        await asyncio.sleep(0.1)  # the background poller is now inside GetLoad
        polling = asyncio.create_task(pools.poll())
        await asyncio.sleep(0.1)
        pools.set_members(Role.DECODE, [])
        await asyncio.wait_for(polling, 5)  # returns, does not raise
        assert pools.describe()["pods"] == []
        assert pools._task is not None and not pools._task.done()  # the poller lives on
        for _ in range(50):  # the channel closes once the poll is over
            if pod.channel is None:
                break
            await asyncio.sleep(0.1)
        assert pod.channel is None
        await pools.close()

    asyncio.run(scenario())
