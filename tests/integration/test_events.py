"""The event log and its streams against real node processes and real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest

from tessera_client import AsyncClient
from tessera_client.pb import events_pb2
from tests.fixtures.calls import bad_fields, put, reason_of, run_cli
from tests.fixtures.events import event, opened, publish_many, read_n, read_until, subscribe
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.valkey import free_port

BEGINNING = events_pb2.START_POSITION_BEGINNING
NOW = events_pb2.START_POSITION_NOW
CURSOR = events_pb2.START_POSITION_CURSOR






async def test_writes_and_publishes_arrive_in_sequence_order_with_ids_and_cursors(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        await c.command.Execute(put("acme", "task", "t1", "k1"))
        one = await c.events.Publish(event("task.done", subject=("acme", "task", "t1"), ok=True))
        batch = await publish_many(c, [event("build.finished", n=i) for i in range(3)])
        call = subscribe(c, start=BEGINNING)
        got = await read_n(call, 5)
        call.cancel()
    assert [e.type for e in got] == ["task.put", "task.done"] + ["build.finished"] * 3
    assert [e.sequence for e in got] == sorted(e.sequence for e in got)
    assert len({e.sequence for e in got}) == 5 and len({e.id for e in got}) == 5
    assert got[1].id == one.event.id and got[1].cursor == one.event.cursor
    assert [e.id for e in got[2:]] == [e.id for e in batch]
    assert got[1].subject.kind == "task" and got[1].data["ok"] is True
    assert got[0].data["etag"] == "v1" and "title" not in got[0].data
    assert got[1].actor.endswith("/client/local") and got[1].source == "tessera"
    assert not got[2].HasField("subject")


async def test_type_patterns_select_and_start_now_skips_the_past(node: NodeProcess) -> None:
    async with node.client() as c:
        await c.events.Publish(event("task.old"))
        call = subscribe(c, "task.*", start=NOW)
        assert await opened(call)
        await c.events.Publish(event("note.made"))
        await c.events.Publish(event("task.step.done"))
        got = await read_n(call, 1)
        call.cancel()
    assert [e.type for e in got] == ["task.step.done"]


async def test_publish_is_idempotent_per_key_and_refuses_a_reused_key(node: NodeProcess) -> None:
    async with node.client() as c:
        a = await c.events.Publish(event("task.done", key="once", n=1))
        b = await c.events.Publish(event("task.done", key="once", n=1))
        assert (a.event.id, a.event.sequence) == (b.event.id, b.event.sequence)
        batch = await publish_many(c, [event("task.done", key="once", n=1),
                                       event("task.done", key="twice", n=2),
                                       event("task.done", key="twice", n=2)])
        assert batch[0].id == a.event.id and batch[1].id == batch[2].id
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.events.Publish(event("task.done", key="once", n=2))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(("request_", "field"), [
    (event("resource.put"), "type"),
    (event("operation.done"), "type"),
    (event("agent.spawned"), "type"),
    (event("task.put"), "type"),  # what writes of a task append
    (event("nodots"), "type"),
    (event("Task.Done"), "type"),
    (event("task.done", subject=("acme", "nokind", "x")), "subject.kind"),
    (event("task.done", blob="x" * 70_000), "data"),
    # What jsonb cannot store is the caller's mistake, not an INTERNAL error.
    (event("task.done", v=float("nan")), "data"),
    (event("task.done", v=float("-inf")), "data"),
    (event("task.done", s="a\x00b"), "data"),
    (event("task.done", **{"k\x00": 1}), "data"),
])
async def test_publish_refuses_invalid_events_naming_the_field(
    node: NodeProcess, request_: events_pb2.PublishRequest, field: str,
) -> None:
    async with node.client() as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.events.Publish(request_)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The field itself, or a path inside it (the call path names `data.v` for a NaN in v).
    assert any(f == field or f.startswith(f"{field}.") for f in bad_fields(exc.value)), \
        bad_fields(exc.value)


async def test_durable_subscriber_reconnects_and_receives_every_event_in_order(
    node: NodeProcess,
) -> None:
    n = 300
    async with node.client() as c:
        first = subscribe(c, "job.*", start=BEGINNING, durable="worker")
        published = await publish_many(c, [event("job.ran", i=i) for i in range(n)])
        got = await read_n(first, 120)
        # Acknowledge the first 100 only, then drop the connection mid-stream.
        await c.events.Ack(events_pb2.AckRequest(subscription="worker", cursor=got[99].cursor))
        first.cancel()
        # The lock of the closed stream is released in the background: retry until free.
        again = await _reopen(c, "worker", start=BEGINNING)  # resumes; does not rewind
        rest = await read_until(again, lambda e: e.id == published[-1].id)
        again.cancel()
    assert [e.data["i"] for e in rest] == list(range(100, n))
    seen = [int(e.data["i"]) for e in got] + [int(e.data["i"]) for e in rest]
    assert set(seen) == set(range(n))  # all N, each at least once
    assert [e.sequence for e in rest] == sorted(e.sequence for e in rest)


async def _reopen(c: AsyncClient, name: str, *,
                  start: int = events_pb2.START_POSITION_UNSPECIFIED) -> grpc.aio.UnaryStreamCall:
    """Open a durable stream, retrying while the previous stream's lock is being released."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        call = subscribe(c, durable=name, start=start)
        if await opened(call):
            return call
        code = await call.code()
        if code != grpc.StatusCode.FAILED_PRECONDITION or loop.time() > deadline:
            raise AssertionError(f"durable subscription {name} did not reopen: {code}")
        await asyncio.sleep(0.1)


async def test_an_acknowledged_publish_survives_sigkill(node: NodeProcess) -> None:
    async with node.client() as c:
        created = await _reopen(c, "billing", start=NOW)  # its position: now
        created.cancel()
        ack = await c.events.Publish(event("order.placed", key="o-1", total=12))
    node.crash()  # SIGKILL right after the acknowledged publish: nothing gets to clean up
    node.start()
    async with node.client() as c:
        call = await _reopen(c, "billing")
        got = await read_n(call, 1)
        call.cancel()
    assert got[0].id == ack.event.id and got[0].type == "order.placed"


async def test_two_replicas_on_one_database_deliver_each_others_events(
    node_factory: NodeFactory,
) -> None:
    a = node_factory(name="replica")
    b = node_factory(name="replica", env={"TESSERA_STORE_DSN": a.env["TESSERA_STORE_DSN"]})
    async with b.client() as cb, a.client() as ca:
        call = subscribe(cb, "deploy.*", start=NOW)
        assert await opened(call)
        sent = await ca.events.Publish(event("deploy.started", env="prod"))
        got = await read_until(call, lambda e: e.id == sent.event.id, timeout_s=30)
        call.cancel()
    assert got[-1].cursor == sent.event.cursor  # one log, one cursor space


async def test_another_caller_cannot_read_or_ack_a_durable_subscription(
    node: NodeProcess,
) -> None:
    async with node.client("client") as owner, node.client("admin") as other:
        early = await owner.events.Publish(event("mail.sent", n=0))
        mine = subscribe(owner, start=BEGINNING, durable="inbox")
        assert (await read_until(mine, lambda e: e.id == early.event.id))[-1].id == early.event.id
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await other.events.Ack(events_pb2.AckRequest(subscription="inbox",
                                                         cursor=early.event.cursor))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        # The same name under another caller is a different subscription, starting now: it
        # never sees the owner's position or the events before it.
        theirs = subscribe(other, durable="inbox", start=events_pb2.START_POSITION_UNSPECIFIED)
        assert await opened(theirs)
        later = await owner.events.Publish(event("mail.sent", n=1))
        got = await read_until(theirs, lambda e: e.id == later.event.id)
        assert [e.id for e in got] == [later.event.id]
        mine.cancel()
        theirs.cancel()


async def test_one_open_stream_per_durable_subscription(node: NodeProcess) -> None:
    async with node.client() as c:
        first = await _reopen(c, "solo")
        second = subscribe(c, durable="solo")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await second.read()
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "SUBSCRIPTION_OPEN"
        first.cancel()


async def test_cursor_older_than_retention_is_out_of_range_naming_the_oldest(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env={"TESSERA_EVENTS_RETENTION_MAX_COUNT": "5",
                             "TESSERA_EVENTS_PRUNE_INTERVAL_S": "0.2"})
    async with node.client() as c:
        old = (await c.events.Publish(event("log.line", n=0))).event
        await publish_many(c, [event("log.line", n=i) for i in range(1, 30)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # pruning runs in the node; wait for it to pass the old cursor
            call = subscribe(c, start=CURSOR, cursor=old.cursor)
            try:
                await read_n(call, 1, timeout_s=5)
            except grpc.aio.AioRpcError as exc:
                err = exc
                break
            finally:
                call.cancel()
            assert loop.time() < deadline, "events were never pruned"
            await asyncio.sleep(0.2)
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        assert reason_of(err) == "CURSOR_EXPIRED"
        oldest = re.search(r"cursor (c1_[A-Za-z0-9_-]+)", err.details() or "")
        assert oldest is not None, err.details()
        # The named cursor is accepted and delivers the oldest retained events.
        call = subscribe(c, start=CURSOR, cursor=oldest.group(1))
        got = await read_n(call, 1)
        call.cancel()
        assert got[0].sequence > old.sequence


async def test_streams_are_audited_when_they_open_and_close_with_the_count(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        await publish_many(c, [event("audit.me", n=i) for i in range(3)])
        call = subscribe(c, "audit.*", start=BEGINNING)
        await read_n(call, 3)
        call.cancel()
    dsn = node.env["TESSERA_STORE_DSN"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT reason FROM audit_log WHERE method = 'Subscribe' ORDER BY sequence")
            reasons = [r[0] for r in await cur.fetchall()]
        if len(reasons) >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert reasons[0] == "STREAM_OPENED"
    assert reasons[1].endswith("delivered=3"), reasons


async def test_idle_subscriber_keeps_node_memory_bounded(node: NodeProcess) -> None:
    # The serving process (the supervisor's child, when there is one) holds the streams.
    pid = (node.serving_pids or [int(node.state["pid"])])[0]
    async with node.client() as c, node.client() as idle_client:
        await c.events.Publish(event("warm.up"))
        before = _rss_kib(pid)
        idle = subscribe(idle_client, "bulk.*", start=BEGINNING)  # never read
        assert await opened(idle)
        payload = "x" * 3000
        for start in range(0, 50_000, 1000):
            await c.events.PublishBatch(events_pb2.PublishBatchRequest(
                events=[event("bulk.item", n=i, pad=payload) for i in range(start, start + 1000)]))
        after = _rss_kib(pid)
        # The node still serves while the idle stream holds its place, and a stream whose
        # pattern skips all 50,000 finds the one event after them (reads go in windows).
        ok = await c.events.Publish(event("after.bulk"))
        assert ok.event.sequence > 50_000
        late = subscribe(c, "after.*", start=BEGINNING)
        assert [e.id for e in await read_n(late, 1)] == [ok.event.id]
        late.cancel()
        idle.cancel()
    print(f"\nnode RSS with an idle subscriber: {before / 1024:.1f} MiB before, "
          f"{after / 1024:.1f} MiB after 50,000 events (~{50_000 * 3060 / 2**20:.0f} MiB of "
          "payload)")
    # Generous, yet below what buffering the stream's events in the node would take.
    assert after - before < 90 * 1024


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")




async def test_cli_publishes_and_tails_durably(node: NodeProcess) -> None:
    done = run_cli(node, "events", "publish", "task.done", "--subject", "acme/task/t1",
                "--data", '{"by": "cli"}', "--key", "cli-1")
    assert done.returncode == 0, done.stderr
    assert "published task.done as sequence 1" in done.stdout
    again = run_cli(node, "events", "publish", "task.done", "--subject", "acme/task/t1",
                 "--data", '{"by": "cli"}', "--key", "cli-1")
    assert "sequence 1 " in again.stdout  # the same event, not a second one
    run_cli(node, "events", "publish", "task.done", "--data", '{"n": 2}')
    tail = run_cli(node, "events", "tail", "task.*", "--from", "beginning", "--durable", "cli",
                "--limit", "1", "--json")
    assert tail.returncode == 0, tail.stderr
    first = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(e["type"], e["data"]) for e in first] == [("task.done", {"by": "cli"})]
    # The durable subscription acknowledged what it printed: the next tail goes on from there.
    tail = run_cli(node, "events", "tail", "--durable", "cli", "--limit", "1")
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.split()[0] == "2" and '{"n":2}' in tail.stdout
    bad = run_cli(node, "events", "publish", "resource.put")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "reserved" in bad.stderr


async def test_durable_subscriptions_are_capped_per_caller_and_deletable(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env={"TESSERA_EVENTS_MAX_SUBSCRIPTIONS_PER_CALLER": "2"})
    async with node.client() as c, node.client("admin") as other:
        for name in ("s1", "s2"):
            (await _reopen(c, name)).cancel()
        third = subscribe(c, durable="s3")
        assert not await opened(third)
        assert await third.code() == grpc.StatusCode.FAILED_PRECONDITION
        open_one = await _reopen(c, "s1")
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # not while a stream has it open
            await c.events.DeleteSubscription(events_pb2.DeleteSubscriptionRequest(
                subscription="s1"))
        assert reason_of(exc.value) == "SUBSCRIPTION_OPEN"
        open_one.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # another caller's: not found
            await other.events.DeleteSubscription(events_pb2.DeleteSubscriptionRequest(
                subscription="s2"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        await _delete(c, "s2")
        (await _reopen(c, "s3")).cancel()  # room again


async def _delete(c: AsyncClient, name: str) -> None:
    """Delete a durable subscription, retrying while its closed stream's lock is released."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            await c.events.DeleteSubscription(events_pb2.DeleteSubscriptionRequest(
                subscription=name))
            return
        except grpc.aio.AioRpcError as exc:
            if reason_of(exc) != "SUBSCRIPTION_OPEN" or loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_show_open_streams_and_their_lag(node_factory: NodeFactory) -> None:
    mport = free_port()
    node = node_factory(env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{mport}"})

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            return str(r.read().decode())

    async with node.client() as c, node.client() as idle_client:
        idle = subscribe(idle_client, start=BEGINNING)  # never read: it falls behind
        assert await opened(idle)
        await publish_many(c, [event("lag.item", n=i, pad="x" * 2000) for i in range(3000)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            text = await asyncio.to_thread(scrape)
            lag = _metric(text, "tessera_event_stream_max_lag_events") or 0.0
            # The head gauge follows the LISTEN connection's notifications: wait for both.
            head = _metric(text, "tessera_event_log_head") or 0.0
            if (lag > 0 and head >= 3000) or loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
        idle.cancel()
    assert _metric(text, 'tessera_event_streams{caller="local"}') == 1.0
    assert lag > 0 and (_metric(text, "tessera_event_log_head") or 0) >= 3000
    assert _metric(text, "tessera_event_listener_up") == 1.0
    assert (_metric(text, "tessera_events_published_total") or 0) >= 3000


async def test_idle_streams_get_heartbeats_whose_cursor_can_be_acknowledged(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env={"TESSERA_EVENTS_KEEPALIVE_S": "0.2"})
    async with node.client() as c:
        skipped = await c.events.Publish(event("noise.made"))
        call = subscribe(c, "wanted.*", start=BEGINNING, durable="quiet")
        assert await opened(call)
        beat = await asyncio.wait_for(call.read(), 30)
        assert isinstance(beat, events_pb2.EventEnvelope)
        assert beat.heartbeat and not beat.type and beat.cursor == skipped.event.cursor
        # Acknowledging the heartbeat moves past events the patterns did not select.
        ack = await c.events.Ack(events_pb2.AckRequest(subscription="quiet", cursor=beat.cursor))
        assert ack.cursor == skipped.event.cursor
        call.cancel()


async def test_concurrent_writers_are_seen_in_commit_order_without_gaps(node: NodeProcess) -> None:
    """Sequence order is commit order: a reader following the log while many transactions
    commit concurrently sees every sequence exactly once, consecutively, never one that
    committed late below a sequence it already passed."""
    writers, each = 8, 40
    async with node.client() as c:
        call = subscribe(c, start=NOW)
        assert await opened(call)

        async def publisher(w: int) -> None:
            for i in range(each):
                if i % 4 == 0:
                    await c.command.Execute(put("acme", "task", f"w{w}-{i}", f"w{w}-{i}"))
                else:
                    await c.events.Publish(event("race.step", w=w, i=i))

        await asyncio.gather(*(publisher(w) for w in range(writers)))
        got = await read_n(call, writers * each)
        call.cancel()
    sequences = [e.sequence for e in got]
    assert sequences == list(range(sequences[0], sequences[0] + writers * each))


async def test_a_revoked_certificate_ends_its_open_stream(node: NodeProcess) -> None:
    from cryptography import x509

    from tessera.pki import record_revocation_at

    serial = x509.load_pem_x509_certificate(
        (node.pki / "client.crt").read_bytes()).serial_number
    async with node.client() as c:
        call = subscribe(c, start=NOW)
        assert await opened(call)
        # As `tessera certs revoke` with a DSN records it: every replica hears the NOTIFY.
        assert await record_revocation_at(node.env["TESSERA_STORE_DSN"], serial, "test")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            while True:
                msg = await asyncio.wait_for(call.read(), 30)
                assert msg is not grpc.aio.EOF
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(exc.value) == "CERT_REVOKED"


async def test_a_revoked_stream_whose_consumer_stopped_reading_is_released(
    node_factory: NodeFactory,
) -> None:
    from cryptography import x509

    from tessera.pki import record_revocation_at

    mport = free_port()
    node = node_factory(env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{mport}"})

    def streams() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            return _metric(r.read().decode(), 'tessera_event_streams{caller="local"}') or 0.0

    serial = x509.load_pem_x509_certificate(
        (node.pki / "client.crt").read_bytes()).serial_number
    async with node.client("client") as reader, node.client("admin") as writer:
        idle = subscribe(reader, start=BEGINNING)  # never read: parked in flow control
        assert await opened(idle)
        await publish_many(writer, [event("fill.up", n=i, pad="x" * 4000) for i in range(3000)],
                           batch=500)
        assert await asyncio.to_thread(streams) == 1.0
        assert await record_revocation_at(node.env["TESSERA_STORE_DSN"], serial, "test")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await asyncio.to_thread(streams) != 0.0:
            assert loop.time() < deadline, "the parked stream was never released"
            await asyncio.sleep(0.2)
        idle.cancel()


async def test_open_streams_are_capped_per_caller(node: NodeProcess) -> None:
    # Each open stream may hold a page of events (stream_buffer x max_payload_bytes) while
    # its consumer is slow: a caller opening streams without end would exhaust the node.
    cap = 16  # events.max_streams_per_caller
    async with node.client() as c, node.client("admin") as other:
        calls = [subscribe(c, start=NOW) for _ in range(cap)]
        for call in calls:
            assert await opened(call)
        extra = subscribe(c, start=NOW)
        assert not await opened(extra)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await extra.read()
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_caller" in (exc.value.details() or "")
        # The cap is per caller: another identity still subscribes.
        theirs = subscribe(other, start=NOW)
        assert await opened(theirs)
        theirs.cancel()
        calls[0].cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # the cancelled stream leaves the node in the background
            again = subscribe(c, start=NOW)
            if await opened(again):
                break
            assert loop.time() < deadline, "a closed stream still counted against the cap"
            await asyncio.sleep(0.1)
        again.cancel()
        for call in calls[1:]:
            call.cancel()


async def test_a_batch_whose_response_would_not_fit_is_refused_before_it_commits(
    node: NodeProcess,
) -> None:
    # The response echoes every event (data, cursor, id, actor): a request just under the
    # 4 MiB limit used to commit and then answer more than a default client can receive.
    async with node.client() as c:
        before = (await c.events.Publish(event("mark.before"))).event.sequence
        # 4,165,000 bytes: under the node's 4 MiB request limit, its response is not.
        big = [event("bulk.item", subject=("acme", "task", "t1"), n=i, pad="x" * 4100)
               for i in range(1000)]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.events.PublishBatch(events_pb2.PublishBatchRequest(events=big))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events" in bad_fields(exc.value)
        after = (await c.events.Publish(event("mark.after"))).event.sequence
        assert after == before + 1  # nothing of the refused batch was appended
        ok = await c.events.PublishBatch(events_pb2.PublishBatchRequest(events=big[:500]))
        assert len(ok.events) == 500
