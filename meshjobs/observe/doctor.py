"""``meshjobs doctor``: is this mesh able to do work, seen from here?

Each check is a function that returns one :class:`Check` (pass, fail or
skip, with one sentence). The checks, in order:

- **broker**: the server answers a round trip, and which version it runs;
- **jetstream**: JetStream answers through the hub domain (``$JS.<domain>.API``),
  which is how leaf clients reach mesh state;
- **state**: every stream and bucket of :data:`meshjobs.catalog.MESH_STATE`
  exists, and, given a topology, with its ``state_replicas`` replicas in its
  ``state_region``, all of them current;
- **capability <name>**: someone consumes the capability's queue group. The
  probe is a *signed envelope that expired a day ago*: a worker verifies the
  signature, trust and validity window before anything else and answers with
  a signed ``expired`` (or ``untrusted``) rejection, so the probe proves that
  the queue group has a live, verifying consumer and runs nothing. (A
  harmless job cannot be built for an arbitrary capability, and a worker
  whose clock is a day behind is a failure worth reporting: it would run it,
  and the check says so.) Capabilities come from discovery plus any the
  operator names (``--capability``), so a capability nobody serves any more
  fails too;
- **locality**: given a topology, the server this connection landed on is
  looked up in it; where a worker of this community (on a leaf) or region
  (on a hub node) advertises a capability, the probe must have been answered
  by such a worker — queue groups prefer local members strictly, so a remote
  answer means the local ones are not in the group. Worker places are the
  region and community labels workers advertise (unsigned: a hint);
- **clocks**: the signed rejection carries the worker's time of signing;
  each answering worker's clock must agree with this machine's within the
  replay window (the workers' clock-skew tolerance, 60 s by default), allowing
  for the round trip;
- **trust**: the trust file parses and lists at least one ``[[operator]]``
  (without one, quarantine orders are honoured from nobody).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from meshjobs._nats import close_quietly, connect, denied
from meshjobs.discovery import PeerInfo, discover
from meshjobs.envelope import digest, new_job_id, now_ms, open_result, seal_envelope
from meshjobs.errors import MeshError
from meshjobs.identity import Identity
from meshjobs.infra.topology import Topology
from meshjobs.state import DOMAIN, BucketSpec, StateSpec
from meshjobs.subjects import queue_subject

PASS, FAIL, SKIP = "pass", "fail", "skip"
PROBE_AGE_MS = 86_400_000  # the probe envelope expired this long ago
DEFAULT_SKEW_S = 60.0


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail, **self.data}


@dataclass
class Probe:
    """What probing one capability's queue group came to."""

    capability: str
    worker: str | None = None
    status: str = ""
    rtt_ms: float = 0.0
    offset_ms: float = 0.0
    problem: str = ""


@dataclass
class Options:
    """What the doctor is asked to check against."""

    servers: list[str]
    identity: Identity
    trust_file: Path
    topology: Topology | None = None
    capabilities: tuple[str, ...] = ()
    specs: tuple[StateSpec, ...] = ()
    max_skew_s: float = DEFAULT_SKEW_S
    timeout: float = 2.0


async def diagnose(options: Options) -> list[Check]:
    """Run every check; a broker that does not answer skips the ones that need it."""
    from meshjobs.trust.policy import load_trust

    checks: list[Check] = []
    try:
        nc = await connect(options.servers, options.identity, name="meshjobs-doctor", connect_timeout=options.timeout)
    except MeshError as exc:
        checks.append(Check("broker", FAIL, str(exc)))
        skipped = ("jetstream", "state", "capabilities", "locality", "clocks")
        checks += [Check(name, SKIP, "needs the broker") for name in skipped]
    else:
        try:
            checks += await _connected_checks(nc, options)
        finally:
            await close_quietly(nc)
    checks.append(check_trust(options.trust_file, load_trust))
    return checks


async def _connected_checks(nc: NATS, options: Options) -> list[Check]:
    domain = options.topology.mesh.domain if options.topology else DOMAIN
    checks = [await check_broker(nc, options.timeout)]
    probe_stream = _stream_name(options.specs[0]) if options.specs else "JOBS"
    js_check = await check_jetstream(nc, domain, probe_stream, options.timeout)
    checks.append(js_check)
    if js_check.status == PASS:
        checks.append(await check_state(nc, domain, options.specs, options.topology, options.timeout))
    else:
        checks.append(Check("state", SKIP, "needs JetStream"))
    peers = await discover(nc, timeout=min(options.timeout, 1.0))
    offered = {cap for p in peers for cap in p.capabilities}
    wanted = sorted(offered | set(options.capabilities))
    probes = await asyncio.gather(*(probe(nc, options.identity, cap, options.timeout) for cap in wanted))
    checks += [capability_check(p, peers) for p in probes]
    if not wanted:
        checks.append(Check("capabilities", SKIP, "no worker answered discovery: nothing to probe"))
    checks.append(check_locality(nc, options.topology, probes, peers))
    checks.append(check_clocks(probes, options.max_skew_s))
    return checks


async def check_broker(nc: NATS, timeout: float) -> Check:
    started = time.monotonic()
    try:
        await nc.flush(timeout=max(1, round(timeout)))
    except (nats.errors.Error, TimeoutError) as exc:
        return Check("broker", FAIL, f"connected but no round trip: {exc or type(exc).__name__}")
    rtt = (time.monotonic() - started) * 1000
    url = nc.connected_url.geturl() if nc.connected_url else "?"
    v = nc.connected_server_version
    version = f"{v.major}.{v.minor}.{v.patch}"
    return Check("broker", PASS, f"{url} answered in {rtt:.1f} ms (nats-server {version})", {"rtt_ms": round(rtt, 3)})


async def check_jetstream(nc: NATS, domain: str, stream: str, timeout: float) -> Check:
    """JetStream answers through *domain*: a stream lookup (peers may not ask for account info)."""
    js = nc.jetstream(domain=domain, timeout=timeout)
    started = time.monotonic()
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        pass  # JetStream answered: the stream check below says what is missing
    except nats.errors.NoRespondersError:
        detail = f"nobody answers $JS.{domain}.API: JetStream is off here or the domain {domain!r} is unknown"
        return Check("jetstream", FAIL, detail)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        why = "this key may not ask" if denied(nc, f"$JS.{domain}.API.STREAM.INFO.{stream}") else exc
        return Check("jetstream", FAIL, f"domain {domain!r}: {why or type(exc).__name__}")
    rtt = (time.monotonic() - started) * 1000
    return Check("jetstream", PASS, f"domain {domain!r} answers in {rtt:.1f} ms", {"domain": domain})


def _stream_name(spec: StateSpec) -> str:
    return f"KV_{spec.name}" if isinstance(spec, BucketSpec) else spec.name


async def check_state(
    nc: NATS, domain: str, specs: Iterable[StateSpec], topology: Topology | None, timeout: float
) -> Check:
    """Every stream and bucket exists (with the topology's replicas and region, all replicas current)."""
    js = nc.jetstream(domain=domain, timeout=timeout)
    want = topology.mesh.state_replicas if topology else None
    region = topology.state_region.name if topology else None
    names, problems, hidden = [_stream_name(s) for s in specs], [], []
    for name in names:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            problems.append(f"{name} missing")
            continue
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if denied(nc, f"$JS.{domain}.API.STREAM.INFO.{name}"):
                hidden.append(name)  # operators only (it would list every job): not this key's to check
            else:
                problems.append(f"{name}: {exc or type(exc).__name__}")
            continue
        replicas = info.config.num_replicas or 1
        placed = info.config.placement.cluster if info.config.placement else None
        where = placed or (info.cluster.name if info.cluster else None)
        if want is not None and replicas != want:
            problems.append(f"{name} has {replicas} replica(s), the topology asks for {want}")
        if region is not None and where is not None and where != region:
            problems.append(f"{name} lives in {where}, the topology says {region}")
        lagging = [r.name for r in (info.cluster.replicas or []) if r.offline or not r.current] if info.cluster else []
        if lagging:
            problems.append(f"{name}: replica(s) {', '.join(str(n) for n in lagging)} offline or behind")
    data = {"streams": names, "problems": problems, "not_visible": hidden}
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        return Check("state", FAIL, "; ".join(problems[:4]) + more, data)
    how = f", {want} replica(s) each in {region}" if want else ""
    unseen = f"; {', '.join(hidden)}: operators only, run doctor as one to check" if hidden else ""
    return Check("state", PASS, f"{len(names) - len(hidden)} streams and buckets present{how}{unseen}", data)


async def probe(nc: NATS, identity: Identity, capability: str, timeout: float) -> Probe:
    """Send an envelope that expired a day ago through *capability*'s queue group; see what answers."""
    issued = now_ms() - PROBE_AGE_MS
    audience = queue_subject(capability)
    _, frame = seal_envelope(
        identity, capability, {}, audience=audience, job_id=new_job_id(), ttl_ms=1, issued_at=issued
    )
    result = Probe(capability)
    sent = time.monotonic()
    try:
        msg = await nc.request(audience, frame, timeout=timeout)
    except nats.errors.NoRespondersError:
        result.problem = f"nothing consumes {audience} (no responders)"
        return result
    except (nats.errors.Error, TimeoutError) as exc:
        result.problem = f"no answer on {audience} within {timeout:g} s ({type(exc).__name__})"
        return result
    received, rtt = now_ms(), (time.monotonic() - sent) * 1000
    try:
        answer = open_result(msg.data)
    except MeshError as exc:
        result.problem = f"an answer that is not a valid signed result: {exc}"
        return result
    if answer.request_digest != digest(frame):
        result.problem = "the signed answer is bound to another request"
        return result
    result.worker, result.rtt_ms = answer.worker, rtt
    result.status = answer.error.code if answer.status == "rejected" and answer.error else answer.status
    # The worker signed at some point during the round trip: its midpoint is the best estimate.
    result.offset_ms = answer.issued_at - (received - rtt / 2)
    if answer.status != "rejected":
        result.problem = f"{answer.worker[:12]}… RAN a job that expired a day ago ({answer.status}): check its clock"
    return result


def _place(peer: PeerInfo) -> str:
    return "/".join(x for x in (peer.region, peer.community) if x) or "unlabelled"


def capability_check(p: Probe, peers: list[PeerInfo]) -> Check:
    offering = [x for x in peers if p.capability in x.capabilities]
    data = {
        "capability": p.capability,
        "advertised_by": len(offering),
        "worker": p.worker,
        "rtt_ms": round(p.rtt_ms, 3),
    }
    name = f"capability {p.capability}"
    if p.problem:
        who = f"advertised by {len(offering)} worker process(es) but " if offering else "not advertised; "
        return Check(name, FAIL, who + p.problem, data)
    where = next((_place(x) for x in offering if x.peer == p.worker), "not in discovery")
    detail = f"consumed by {str(p.worker)[:12]}… ({where}): a signed {p.status!r} refusal in {p.rtt_ms:.1f} ms"
    return Check(name, PASS, detail, data)


def check_clocks(probes: list[Probe], max_skew_s: float) -> Check:
    answered = [p for p in probes if p.worker is not None]
    if not answered:
        return Check("clocks", SKIP, "no worker answered a probe: no clock to compare")
    # The uncertainty of each estimate is half its round trip.
    worst = max(answered, key=lambda p: abs(p.offset_ms) + p.rtt_ms / 2)
    bound_s = (abs(worst.offset_ms) + worst.rtt_ms / 2) / 1000
    data = {"max_offset_ms": round(worst.offset_ms, 1), "limit_s": max_skew_s}
    workers = len({p.worker for p in answered})
    if bound_s > max_skew_s:
        detail = f"{str(worst.worker)[:12]}…'s clock is {worst.offset_ms / 1000:+.1f} s off this machine's"
        return Check("clocks", FAIL, f"{detail}, beyond the {max_skew_s:g} s replay window", data)
    detail = f"{workers} worker(s) within {bound_s * 1000:.0f} ms of this machine (replay window {max_skew_s:g} s)"
    return Check("clocks", PASS, detail, data)


def local_place(nc: NATS, topology: Topology) -> tuple[str, str] | None:
    """("community", name) or ("region", name) of the server this connection landed on, from the topology."""
    url = nc.connected_url
    if url is None:
        return None
    for community in topology.community:
        if url.port == community.client_port:
            return "community", community.name
    for region in topology.region:
        if any(url.port == node.client_port for node in region.nodes):
            return "region", region.name
    return None


def check_locality(nc: NATS, topology: Topology | None, probes: list[Probe], peers: list[PeerInfo]) -> Check:
    if topology is None:
        return Check("locality", SKIP, "needs --topology to know where this server sits")
    here = local_place(nc, topology)
    if here is None:
        return Check("locality", SKIP, "this connection's server is not in the topology")
    kind, name = here
    regions = {c.name: c.region for c in topology.community}

    def is_local(peer: PeerInfo) -> bool:
        if kind == "community":
            return peer.community == name
        return (peer.region or regions.get(peer.community, "")) == name

    remote, checked = [], 0
    for p in probes:
        local = [x for x in peers if p.capability in x.capabilities and is_local(x)]
        if p.worker is None or not local:
            continue
        checked += 1
        if p.worker not in {x.peer for x in local}:
            remote.append(f"{p.capability} answered by {p.worker[:12]}… although {len(local)} local worker(s) offer it")
    if remote:
        return Check("locality", FAIL, "; ".join(remote), {"where": f"{kind} {name}"})
    if not checked:
        return Check("locality", SKIP, f"no capability has a worker in {kind} {name} to prefer")
    return Check(
        "locality", PASS, f"{checked} capability(ies) answered within {kind} {name}", {"where": f"{kind} {name}"}
    )


def check_trust(path: Path, load: Any) -> Check:
    if not path.exists():
        return Check("trust", FAIL, f"no trust file at {path}: list at least one [[operator]]")
    try:
        policy = load(path, required=True)
    except MeshError as exc:
        return Check("trust", FAIL, str(exc))
    if not policy.operators:
        return Check("trust", FAIL, f"{path} lists no [[operator]]: quarantine orders would be honoured from nobody")
    data = {"peers": len(policy.keys), "operators": len(policy.operators)}
    return Check("trust", PASS, f"{path} parses: {len(policy.keys)} key(s), {len(policy.operators)} operator(s)", data)
