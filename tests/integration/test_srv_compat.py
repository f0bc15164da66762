"""$SRV.PING/INFO/STATS replies parse with nats-py's own micro types, and STATS count durable runs."""

from __future__ import annotations

import secrets

import nats
import pytest
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from meshjobs import App, Client, HandlerError, Identity
from meshjobs.discovery import collect
from meshjobs.durable import Durable
from meshjobs.infra.broker import NatsServer
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.worker import Worker
from meshjobs.trust.policy import TrustPolicy

pytestmark = pytest.mark.integration


async def test_replies_parse_with_nats_micro_types_and_count_durable_runs(broker: NatsServer) -> None:
    cap = f"srv{secrets.token_hex(3)}.work"
    app = App("srvcompat", description="services protocol check")

    @app.capability(cap)
    async def work(fail: bool = False) -> str:
        if fail:
            raise RuntimeError("asked to fail")
        return "done"

    me = Identity.generate()
    worker = Worker(app, me, TrustPolicy(), WorkerConfig(max_attempts=2, retry_delay_s=0.05))
    wnc = await nats.connect(broker.url)
    await worker.start(wnc)
    try:
        async with await Client.connect(broker.url, me) as client:
            assert (await client.submit(cap)).value == "done"
            with pytest.raises(HandlerError):
                await client.submit(cap, {"fail": True})
            durable = await Durable.open(client.nc)
            ok = await durable.submit(me, cap, {})
            dead = await durable.submit(me, cap, {"fail": True})
            await durable.wait(ok, 20)
            await durable.wait(dead, 20)
        subject = f"{worker.instance_id}"
        pings = [ServicePing.from_dict(r) for r in await collect(wnc, f"$SRV.PING.meshjobs.{subject}")]
        infos = [ServiceInfo.from_dict(r) for r in await collect(wnc, f"$SRV.INFO.meshjobs.{subject}")]
        stats = [ServiceStats.from_dict(r) for r in await collect(wnc, f"$SRV.STATS.meshjobs.{subject}")]
        everyone = [ServiceStats.from_dict(r) for r in await collect(wnc, "$SRV.STATS")]  # `nats micro stats`
    finally:
        await worker.drain()
        await wnc.close()
    assert [p.id for p in pings] == [worker.instance_id] and pings[0].metadata["peer"] == me.public_key
    (info,) = infos
    assert info.name == "meshjobs" and info.description == "services protocol check"
    subjects = {e.subject: e for e in info.endpoints}
    assert subjects[f"mesh.cmd.{cap}"].queue_group == f"mesh.cmd.{cap}"
    assert subjects[f"mesh.jobs.{cap}"].queue_group == "jobs_" + cap.replace(".", "_")  # the shared consumer
    assert worker.instance_id in {s.id for s in everyone}
    (stat,) = stats
    assert stat.type == "io.nats.micro.v1.stats_response" and stat.metadata["peer"] == me.public_key
    by_subject = {e.subject: e for e in stat.endpoints}
    live, runs = by_subject[f"mesh.cmd.{cap}"], by_subject[f"mesh.jobs.{cap}"]
    assert (live.num_requests, live.num_errors, live.last_error) == (2, 1, "asked to fail")
    assert live.processing_time > 0 and live.average_processing_time == live.processing_time // 2
    # Durable: one run that worked, two attempts of the failing job (--max-attempts 2), then the DLQ.
    assert (runs.num_requests, runs.num_errors, runs.last_error) == (3, 2, "asked to fail")
    assert runs.data == {"path": "durable", "redeliveries": 1, "dead_lettered": 1}
    # The durable endpoint is listed, never subscribed: durable envelopes reach the worker only by pulling
    # (a core subscription on mesh.jobs.* would also deliver them live, to be refused as too long-lived).
    assert worker.rejected == 0
