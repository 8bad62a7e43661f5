"""What the pool does when a replica dies, over fake engine handles (no processes): unstarted and
replayable groups are resent, other groups with a started request fail whole, the replica comes back."""

from __future__ import annotations

import asyncio
import queue

import pytest

from replica_faults import until
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.engine import EngineSettings, EngineStats
from splitfuse.core.request import RequestOutput
from splitfuse.serving.bridge import Replayed
from splitfuse.serving.errors import GroupTooLarge, QueueFull, ReplicaLost
from splitfuse.serving.loop import AddGroup
from splitfuse.serving.replicas import ReplicaPool


class FakeEngine:
    """A replica handle whose engine the test plays: it admits groups (unless told not to) and
    reports whatever the test pushes; die() ends its stream as a crash would."""

    def __init__(self, index: int) -> None:
        self.index, self.pid = index, 100 + index
        self.inbox: queue.Queue = queue.Queue()
        self.groups: list[AddGroup] = []
        self.admits = True
        self.launches = 0

    def launch(self) -> None:
        self.launches += 1

    def wait_ready(self, timeout: float) -> dict:
        return {"tokenizer": None, "settings": EngineSettings(16, 64, 1024, "float32", "fake"),
                "max_model_len": 1024, "sampling_defaults": {}}

    def send(self, command) -> bool:
        if isinstance(command, AddGroup):
            self.groups.append(command)
            if self.admits:
                self.inbox.put(("admitted", command.group_id, None))
        return True

    def receive(self):
        while (message := self.inbox.get()) is not None:
            yield message

    def output(self, request_id: str, finished: bool = False) -> None:
        out = RequestOutput(request_id, [7], "x", finished, "length" if finished else None)
        self.inbox.put(("outputs", [(request_id, out)], EngineStats()))

    def die(self) -> None:
        self.inbox.put(None)

    def exit_reason(self) -> str:
        return "killed by the test"

    def join(self, timeout) -> None:
        self.inbox.put(None)


def request(prompt_len: int = 3, new: int = 5) -> tuple[list[int], SamplingParams]:
    return list(range(prompt_len)), SamplingParams(max_new_tokens=new)


@pytest.fixture
def pool():
    pool = ReplicaPool(None, None, EngineConfig(), 2, engines=FakeEngine)
    yield pool
    pool.close(drain=False, timeout=1)


def test_a_death_resends_unstarted_groups_and_fails_started_ones_whole(pool):
    first, second = (r.engine for r in pool.replicas)

    async def run():
        started = await pool.submit([request(), request()])  # n=2 on replica 0
        await pool.submit([request(new=60)])  # the long one makes replica 1 the busier
        waiting = await pool.submit([request()])  # back to replica 0, never started there
        first.admits = False
        unadmitted = asyncio.create_task(pool.submit([request()]))  # replica 0 never answers it
        await until(lambda: len(first.groups) == 3)
        first.output(started.request_ids[0])  # one choice has started; its sibling has not
        await until(lambda: pool.replicas[0].routes[started.request_ids[0]].started)
        first.die()

        assert (await anext(started))[0] == 0  # the token delivered before the death
        with pytest.raises(ReplicaLost, match="killed by the test"):
            await anext(started)  # then the whole group fails: its siblings cannot make a full answer
        await until(lambda: len(second.groups) == 3)
        resent = {rid for group in second.groups[1:] for _, _, rid in group.requests}
        assert resent == {waiting.request_ids[0], "r3-0"}  # the same requests, same ids
        assert (await unadmitted).request_ids == ["r3-0"]  # its caller only sees it admitted
        second.output(waiting.request_ids[0], finished=True)
        index, out = await anext(waiting)
        assert (index, out.finished, out.new_token_ids) == (0, True, [7])
        await until(lambda: pool.replicas[0].alive)

    asyncio.run(run())
    assert pool.retries == 2 and pool.restarts == 1 and first.launches == 2
    assert pool.stats.replicas[0]["state"] == "ok"


def small_pool(max_seqs: int, max_waiting: int) -> ReplicaPool:
    """Two fake replicas of max_seqs slots and 64 KV blocks of 16 tokens each."""
    return ReplicaPool(None, None, EngineConfig(max_seqs=max_seqs), 2, max_waiting=max_waiting, engines=FakeEngine)


def test_a_burst_into_free_capacity_is_all_admitted(pool):
    pool.max_waiting = 4

    async def burst():
        return await asyncio.gather(*(pool.submit([request()]) for _ in range(40)), return_exceptions=True)

    assert not [error for error in asyncio.run(burst()) if isinstance(error, Exception)]
    assert [r.assigned for r in pool.replicas] == [20, 20]


def test_a_group_no_replica_could_ever_queue_is_too_large():
    pool = small_pool(max_seqs=8, max_waiting=4)
    try:
        with pytest.raises(GroupTooLarge, match="13 completions .* at most 12"):
            asyncio.run(pool.submit([request()] * 13))
        asyncio.run(pool.submit([request()] * 12))  # every slot of one replica, plus the waiting room
    finally:
        pool.close(drain=False, timeout=1)
    assert sum(r.assigned for r in pool.replicas) == 1  # the refused group went nowhere


def test_max_waiting_counts_what_no_replica_can_admit_over_all_replicas():
    """Two slots on each replica: four requests run, one may wait, the sixth is refused until one ends."""
    pool = small_pool(max_seqs=2, max_waiting=1)

    async def run():
        groups = [await pool.submit([request()]) for _ in range(5)]
        with pytest.raises(QueueFull, match="2 requests would wait for capacity"):
            await pool.submit([request()])
        replica = next(r for r in pool.replicas if groups[0].request_ids[0] in r.routes)
        replica.engine.output(groups[0].request_ids[0], finished=True)  # its slot frees
        await until(lambda: sum(len(r.routes) for r in pool.replicas) == 4)
        await pool.submit([request()])

    try:
        asyncio.run(run())
    finally:
        pool.close(drain=False, timeout=1)
    assert sum(r.assigned for r in pool.replicas) == 6  # the refused group went nowhere


def test_a_request_waits_when_no_replica_has_the_kv_blocks_for_it(pool):
    pool.max_waiting = 0

    async def run():
        for _ in range(2):  # 1000 tokens: 63 of a replica's 64 blocks, one such prompt on each
            await pool.submit([request(prompt_len=1000)])
        for _ in range(2):  # one block: fits beside each
            await pool.submit([request(prompt_len=16)])
        with pytest.raises(QueueFull, match="1 requests would wait"):
            await pool.submit([request(prompt_len=16)])

    asyncio.run(run())


def test_a_replayable_group_starts_over_on_another_replica(pool):
    """A consumer that shows nothing before the end (a non-streaming request) marks its group
    replayable: its started choices run again elsewhere, announced by Replayed."""
    first, second = (r.engine for r in pool.replicas)

    async def run():
        group = await pool.submit([request(), request()])  # n=2 on replica 0
        group.replayable = True
        first.output(group.request_ids[0])
        first.output(group.request_ids[1], finished=True)  # this choice is complete: it stays
        received = [await anext(group), await anext(group)]
        first.die()
        replayed = await anext(group)
        await until(lambda: len(second.groups) == 1)
        second.output(group.request_ids[0], finished=True)
        return received, replayed, await anext(group)

    received, replayed, last = asyncio.run(run())
    assert [index for index, _ in received] == [0, 1]
    assert replayed == (0, Replayed)
    assert last[0] == 0 and last[1].finished
    assert [rid for _, _, rid in pool.replicas[1].engine.groups[0].requests] == ["r0-0"]  # only the open one
    assert pool.retries == 1
