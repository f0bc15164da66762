"""Rendering nats-server configuration. Pure functions: data in, text out.

:func:`render` turns nested dicts, lists and scalars into nats-server's config
syntax; builders such as :func:`single_node` produce those dicts. Every
rendering is checked with ``nats-server -t`` in the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from meshjobs.infra.topology import (
    OPERATOR,
    PEER_ROLES,
    SUBMITTER,
    TRUST_SERVICE,
    WORKER,
    Community,
    Node,
    Region,
    Topology,
)

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON string syntax is valid nats-server syntax and escapes safely.
        return json.dumps(str(value))
    raise TypeError(f"cannot render {type(value).__name__} in a nats-server config")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


class Include(str):
    """A value rendered as an ``include "path"`` directive (its dict key is ignored).

    Secrets live in included files so rendered configs can be committed.
    """


class Var(str):
    """A reference to a variable defined in an included file: rendered as ``$NAME``."""


def _line(key: str, value: Any, indent: int) -> str:
    if isinstance(value, Include):
        return f"include {json.dumps(str(value))}"
    return f"{_key(key)}: {_render(value, indent)}"


def _render(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, Var):
        return f"${value}"
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = [f"{pad}  {_line(k, v, indent + 1)}" for k, v in value.items() if v is not None]
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = [f"{pad}  {_render(v, indent + 1)}" for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    return _scalar(value)


def render(config: dict[str, Any], header: str = "") -> str:
    """Render a top-level config dict. Keys whose value is None are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [_line(k, v, 0) for k, v in config.items() if v is not None]
    return "\n".join(lines) + "\n"


def hostport(host: str, port: int | None) -> str:
    """``host:port`` for a listen setting; None asks for a random port; IPv6 in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{-1 if port is None else port}"


def single_node(
    *,
    store_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    monitor_port: int | None = None,
    server_name: str = "meshjobs",
    domain: str | None = None,
    log_file: Path | None = None,
    sync_interval: str | None = None,
    admitted: dict[str, frozenset[str]] | None = None,
    account: str = "MESH",
) -> dict[str, Any]:
    """One nats-server with JetStream: the embedded default of ``meshjobs up``.

    A port of None asks the server for a random free one (reported in its log).
    With *admitted* (key -> roles) the server is closed: only those keys log
    in, each with its roles' permissions (an empty mapping admits nobody).
    """
    jetstream: dict[str, Any] = {"store_dir": store_dir}
    if domain:
        jetstream["domain"] = domain
    if sync_interval:
        jetstream["sync_interval"] = sync_interval
    config: dict[str, Any] = {
        "server_name": server_name,
        "listen": hostport(host, port),
        "http": hostport(host, monitor_port),
        "jetstream": jetstream,
        "log_file": log_file,
    }
    if admitted is not None:
        config["accounts"] = {
            account: {"jetstream": "enabled", "users": users(admitted, domain or "hub")},
            "SYS": {"users": []},
        }
        config["system_account"] = "SYS"
    return config


# -- the federated mesh ---------------------------------------------------------
#
# Hub nodes: one cluster per region (routes), gateways between regions, one
# JetStream domain, an app account for all mesh traffic and a system account.
# Community leaves: their own peers, no JetStream, bound to the app account on
# the hub through a leaf credential. Every client and leaf logs in with an
# nkey; anything else is refused. Secrets come from files under secrets/ that
# are included, so the configs themselves contain none.

SECRETS_DIR = "secrets"


def leaf_key_var(community: str) -> str:
    """The variable (defined in secrets/leaf-keys.conf) holding a community leaf's public key."""
    return "LEAF_" + community.upper().replace("-", "_") + "_KEY"


# -- roles ------------------------------------------------------------------------
#
# Each admitted key gets the union of its roles' grants, built from short lists
# of the exact subjects each role uses (nats-py 2.16's JetStream API calls,
# checked against a real server in tests/integration/test_roles.py). Nobody
# but an operator may create, update, delete or purge a stream, or delete a
# consumer. The names below repeat what the owning modules declare in
# meshjobs.catalog (infra imports no job module); a unit test keeps them in step.

#: Buckets workers and submitters write (durable jobs' signed results and claims, job states, live
#: claims, approval requests and signed approval decisions: a decision counts only by its signer).
PEER_BUCKETS = ("job_results", "job_claims", "jobs", "claims", "approvals")
#: Durable jobs' write-once records: peers read them by exact key only (no listing); their keys
#: derive from a secret of the job's frame and their values are sealed (meshjobs.jobrecords).
SEALED_BUCKETS = ("job_results", "job_claims")
#: Durable job states, under ``<submitter key>.<job id>``: each key reads only its own namespace.
STATES_BUCKET = "jobs"
#: Written only by the trust service (and operators).
TRUST_BUCKETS = ("reputation",)
#: Written only by operators.
OPERATOR_BUCKETS = ("quarantine",)
BUCKETS = PEER_BUCKETS + TRUST_BUCKETS + OPERATOR_BUCKETS
#: Buckets any peer may read whole (get by key or by sequence, stream info).
OPEN_BUCKETS = tuple(b for b in BUCKETS if b not in (*SEALED_BUCKETS, STATES_BUCKET))
JOBS_STREAM = "JOBS"
JOBS_SUBJECT = "mesh.jobs"
DLQ_STREAM = "JOBS_DLQ"
DLQ_SUBJECT = "mesh.dlq"
EVIDENCE_STREAM = "EVIDENCE"
STREAMS = (JOBS_STREAM, DLQ_STREAM, EVIDENCE_STREAM)
#: Streams peers read with short-lived consumers the server names (evidence). The dead-letter
#: queue (whole envelopes, arguments included) and job states are listed by operators only.
READ_STREAMS = (EVIDENCE_STREAM,)
#: Buckets watched with ordered consumers (quarantine orders, reputation records).
WATCHED_BUCKETS = ("quarantine", "reputation")
#: Every capability's shared subject; also the pattern its queue group must match.
CMD_SUBJECTS = "mesh.cmd.>"
#: Where people's inboxes announce the jobs they hold (signed; meshjobs.peers.desk): workers only.
DESK_SUBJECTS = "mesh.desk.>"

#: How long a worker may answer a request it received ("running" heartbeats
#: every second, then the result), unless the topology says otherwise.
REPLY_WINDOW = "10m"


def _api(domain: str, *, local: bool = True) -> list[str]:
    """JetStream API prefixes a grant names: on a hub server both, on a leaf (or its link) the domain's.

    A hub server maps ``$JS.<domain>.API.>`` to ``$JS.API.>`` (and
    ``$JS.<domain>.API.$KV.>`` to ``$KV.>``) *before* it checks a client's
    permissions, so there the plain form is what counts and a deny of it
    covers both. A leaf link is checked on the domain form it carries.
    Both forms are listed for hub clients so the grant holds either way.
    """
    return ["$JS.API", f"$JS.{domain}.API"] if local else [f"$JS.{domain}.API"]


def _kv_writes(buckets: tuple[str, ...], domain: str, local: bool) -> list[str]:
    # Raw $KV.<bucket>.<key> (nats-py's own put, hub only) and the domain
    # form meshjobs.state publishes on, which crosses leaf links.
    raw = [f"$KV.{b}.>" for b in buckets] if local else []
    return raw + [f"{api}.$KV.{b}.>" for api in _api(domain, local=False) for b in buckets]


def _reads(key: str, domain: str, local: bool) -> list[str]:
    """Reading mesh state: stream info, KV gets, KV watches, short-lived read consumers.

    A direct get with the key in the subject is the only read of the sealed
    buckets and of the ``jobs`` bucket, where *key* reads only its own
    namespace: no get by sequence, no ``STREAM.MSG.GET``, no consumer, no
    stream info (which lists subjects), so none of them can be listed.
    (NATS permits a wildcard in a published subject, and a direct get by
    ``…$KV.<bucket>.>`` returns the bucket's newest message: sealed values
    make that worthless, and for ``jobs`` it stays within one's own namespace.)
    """
    out = []
    for api in _api(domain, local=local):
        out += [f"{api}.STREAM.INFO.{name}" for name in (*STREAMS, *(f"KV_{b}" for b in OPEN_BUCKETS + SEALED_BUCKETS))]
        for bucket in OPEN_BUCKETS:
            stream = f"KV_{bucket}"
            out += [f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>", f"{api}.STREAM.MSG.GET.{stream}"]
        out += [f"{api}.DIRECT.GET.KV_{b}.$KV.{b}.>" for b in SEALED_BUCKETS]
        out.append(f"{api}.DIRECT.GET.KV_{STATES_BUCKET}.$KV.{STATES_BUCKET}.{key}.>")
        # Unnamed create only: the server names the consumer, so nobody can
        # redefine somebody else's by naming it.
        for stream in (*(f"KV_{b}" for b in WATCHED_BUCKETS), *READ_STREAMS):
            out += [f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.INFO.{stream}.*"]
        out += [f"{api}.CONSUMER.MSG.NEXT.{stream}.*" for stream in READ_STREAMS]
    return out + [f"$JS.FC.KV_{b}.>" for b in WATCHED_BUCKETS]


def _grant(publish: list[str], subscribe: list[str], responses: bool = False) -> dict[str, Any]:
    grant: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if responses:
        grant["allow_responses"] = True
    return grant


def _own(key: str) -> list[str]:
    """A key's own inbox: nobody else may subscribe to it."""
    return [f"_INBOX.{key}.>"]


def worker_permissions(key: str, domain: str, *, local: bool = True) -> dict[str, Any]:
    """A worker: capability commands only through their queue groups, its direct subject, durable jobs.

    ``mesh.desk.>`` carries the signed announcements of the jobs people's
    inboxes hold (:mod:`meshjobs.peers.desk`), published and heard by workers.
    NATS binds a subscription to a queue group by pattern: ``mesh.cmd.>`` is
    allowed only in a queue group whose name matches ``mesh.cmd.>`` (the
    runtime names each group like its subject), so a plain subscription is
    refused. NATS cannot require the group to *equal* the subject.
    """
    publish = [f"{DLQ_SUBJECT}.>", DESK_SUBJECTS]
    for api in _api(domain, local=local):
        publish += [
            f"{api}.CONSUMER.INFO.{JOBS_STREAM}.*",
            # Create only, with a filter under mesh.jobs (nats-py's named form);
            # never the unfiltered legacy durable form, never delete.
            f"{api}.CONSUMER.CREATE.{JOBS_STREAM}.*.{JOBS_SUBJECT}.>",
            f"{api}.CONSUMER.MSG.NEXT.{JOBS_STREAM}.*",
        ]
    # Acks and in-progress acks of durable jobs outlive any reply window.
    publish += [f"$JS.ACK.{JOBS_STREAM}.>", *_reads(key, domain, local), *_kv_writes(PEER_BUCKETS, domain, local)]
    subscribe = [f"{CMD_SUBJECTS} {CMD_SUBJECTS}", f"mesh.peer.{key}.>", *_own(key), "$SRV.>", DESK_SUBJECTS]
    return _grant(publish, subscribe, responses=True)


def submitter_permissions(key: str, domain: str, *, local: bool = True) -> dict[str, Any]:
    """A submitter: commands, direct sends, durable jobs, evidence, discovery; replies only to itself."""
    publish = [CMD_SUBJECTS, "mesh.peer.*.cmd.>", f"{JOBS_SUBJECT}.>", "mesh.evidence.>", "$SRV.>"]
    publish += [*_reads(key, domain, local), *_kv_writes((STATES_BUCKET,), domain, local)]
    return _grant(publish, _own(key))


def trust_service_permissions(key: str, domain: str, *, local: bool = True) -> dict[str, Any]:
    """The trust service: reads evidence with its own consumers, the only writer of reputation."""
    publish = ["$SRV.>", *_reads(key, domain, local), *_kv_writes(TRUST_BUCKETS, domain, local)]
    for api in _api(domain, local=local):
        publish += [
            f"{api}.CONSUMER.INFO.{EVIDENCE_STREAM}.*",
            f"{api}.CONSUMER.CREATE.{EVIDENCE_STREAM}.>",
            f"{api}.CONSUMER.MSG.NEXT.{EVIDENCE_STREAM}.*",
        ]
    publish.append(f"$JS.ACK.{EVIDENCE_STREAM}.>")
    return _grant(publish, [*_own(key), "$SRV.>"], responses=True)


def operator_permissions(key: str, domain: str, *, local: bool = True) -> dict[str, Any]:
    """An operator: all of JetStream (provisioning, repairs, quarantine orders), discovery."""
    publish = [f"{api}.>" for api in _api(domain, local=local)] + ["$KV.>", "$JS.ACK.>", "$JS.FC.>", "$SRV.>"]
    return _grant(publish, _own(key))


ROLE_PERMISSIONS = {
    WORKER: worker_permissions,
    SUBMITTER: submitter_permissions,
    TRUST_SERVICE: trust_service_permissions,
    OPERATOR: operator_permissions,
}


def _protected(domain: str, local: bool) -> dict[str, list[str]]:
    """Publishes denied to every key without the role named (a guard should an allow list ever widen)."""
    return {
        TRUST_SERVICE: _kv_writes(TRUST_BUCKETS, domain, local),
        OPERATOR: [
            *_kv_writes(OPERATOR_BUCKETS, domain, local),
            *(
                f"{api}.{verb}.>"
                for api in _api(domain, local=local)
                for verb in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE",
                             "STREAM.MSG.DELETE", "CONSUMER.DELETE", "CONSUMER.DURABLE.CREATE")
            ),
        ],
    }  # fmt: skip


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def role_permissions(
    roles: frozenset[str] | set[str], key: str, domain: str, *, local: bool = True, reply_window: str = REPLY_WINDOW
) -> dict[str, Any]:
    """The union of *roles*' grants for *key*, with the protected subjects of roles it lacks denied.

    ``local=False`` gives the domain forms only (what crosses a leaf link).
    """
    unknown = set(roles) - set(ROLE_PERMISSIONS)
    if unknown:
        raise ValueError(f"unknown role {sorted(unknown)[0]!r}")
    grants = [ROLE_PERMISSIONS[r](key, domain, local=local) for r in ROLE_PERMISSIONS if r in roles]
    publish = _unique([s for g in grants for s in g["publish"]["allow"]])
    subscribe = _unique([s for g in grants for s in g["subscribe"]["allow"]])
    deny: list[str] = []
    for role, subjects in _protected(domain, local).items():
        if role not in roles and OPERATOR not in roles:
            deny += subjects
    perms: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if deny:
        perms["publish"]["deny"] = _unique(deny)
    if any(g.get("allow_responses") for g in grants):
        perms["allow_responses"] = {"max": _seconds(reply_window) + 10, "expires": reply_window}
    return perms


def _seconds(duration: str) -> int:
    number = int(re.match(r"\d+", duration).group())  # type: ignore[union-attr]
    unit = duration[len(str(number)) :]
    return max(1, {"ms": number // 1000, "s": number, "m": number * 60, "h": number * 3600}[unit])


def peer_permissions(key: str, domain: str) -> dict[str, Any]:
    """An ordinary peer: worker and submitter."""
    return role_permissions(PEER_ROLES, key, domain)


def leaf_permissions(peers: dict[str, frozenset[str]], domain: str, reply_window: str = REPLY_WINDOW) -> dict[str, Any]:
    """What a community's leaf may carry between its peers and the hub, and nothing more.

    The union of what its peers' roles need, in the domain form (nothing else
    of JetStream crosses a leaf link); only its own peers' inboxes and direct
    subjects are delivered to it. Two things NATS cannot hold a leaf link to,
    so the leaf's own server holds each of its clients to them instead (see
    :func:`users`): replies (``allow_responses`` does not work across a leaf
    link, so the link may publish to any inbox) and queue groups (the link
    subscribes to ``mesh.cmd.>`` plainly).
    """
    roles: set[str] = set().union(*peers.values()) if peers else set()
    if not roles:
        return {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}
    # A stand-in key: the leaf's own peers' subjects are listed below instead.
    merged = role_permissions(roles, _STAND_IN, domain, local=False, reply_window=reply_window)
    publish = [s for s in merged["publish"]["allow"] if _STAND_IN not in s]
    if WORKER in roles or TRUST_SERVICE in roles:
        publish.append("_INBOX.>")
    # Queue-bound entries do not carry queue interest across a leaf link
    # (verified: nothing is delivered), so the link gets the plain subject;
    # the leaf's own server holds each of its clients to the queue group.
    link = {f"{CMD_SUBJECTS} {CMD_SUBJECTS}": CMD_SUBJECTS}
    subscribe = [link.get(s, s) for s in merged["subscribe"]["allow"] if _STAND_IN not in s]
    for key, key_roles in peers.items():
        subscribe += _own(key)
        publish.append(f"$JS.{domain}.API.DIRECT.GET.KV_{STATES_BUCKET}.$KV.{STATES_BUCKET}.{key}.>")
        if WORKER in key_roles:
            subscribe.append(f"mesh.peer.{key}.>")
    perms: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": _unique(subscribe)}}
    if "deny" in merged["publish"]:
        perms["publish"]["deny"] = merged["publish"]["deny"]
    return perms


_STAND_IN = "STAND-IN"


#: A public key whose seed was thrown away when it was made. A server with no
#: admitted peer lists it so that it still requires authentication: with no
#: users at all, nats-server would let anyone in.
NOBODY = "UC2RCPW47N6INCMVBSY3SREAKTXNALFV3BHB64QWMJC2ZPWYH5JCTSJM"


def users(
    admitted: dict[str, frozenset[str]], domain: str, reply_window: str = REPLY_WINDOW, *, local: bool = True
) -> list[dict[str, Any]]:
    """One nkey user per admitted key, with its roles' permissions (NOBODY when there is none).

    ``local=False`` for a community leaf, which has no JetStream of its own.
    """
    out = [
        {"nkey": key, "permissions": role_permissions(roles, key, domain, local=local, reply_window=reply_window)}
        for key, roles in admitted.items()
    ]
    return out or [{"nkey": NOBODY, "permissions": {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}}]


def hub_node(topology: Topology, region: Region, node: Node, data_dir: Path) -> dict[str, Any]:
    """The config of one hub server."""
    mesh = topology.mesh
    host = mesh.host
    admitted = mesh.roles()
    jetstream: dict[str, Any] = {
        "store_dir": data_dir / node.name,
        "domain": mesh.domain,
        "sync_interval": region.sync_interval,
    }
    # Leaf connections authenticate against the account users when the
    # leafnodes block has no authorization of its own (which only takes one
    # nkey), so each community's leaf is a user of the mesh account.
    leaf_users = [
        {"nkey": Var(leaf_key_var(c.name)), "permissions": leaf_permissions(c.roles(), mesh.domain, mesh.reply_window)}
        for c in topology.community
    ]
    return {
        "server_name": node.name,
        "server_tags": [f"region:{region.name}"],
        "listen": hostport(host, node.client_port),
        "http": hostport(host, node.monitor_port),
        "leaf keys": Include(f"{SECRETS_DIR}/leaf-keys.conf") if topology.community else None,
        "jetstream": jetstream,
        "accounts": {
            mesh.account: {
                "jetstream": "enabled",
                "users": (users(admitted, mesh.domain, mesh.reply_window) if admitted or not leaf_users else [])
                + leaf_users,
            },
            "SYS": {"users": []},
        },
        "system_account": "SYS",
        "cluster": {
            "name": region.name,
            "listen": hostport(host, node.cluster_port),
            "routes": Include(f"{SECRETS_DIR}/routes-{region.name}.conf"),
        },
        "gateway": {
            "name": region.name,
            "listen": hostport(host, node.gateway_port),
            "gateways": Include(f"{SECRETS_DIR}/gateways.conf"),
        },
        "leafnodes": {"listen": hostport(host, node.leaf_port)},
    }


def leaf_node(topology: Topology, community: Community) -> dict[str, Any]:
    """The config of one community broker: a leaf node with its own peers and no JetStream."""
    mesh = topology.mesh
    region = next(r for r in topology.region if r.name == community.region)
    urls = [f"nats-leaf://{_urlhost(mesh.host)}:{n.leaf_port}" for n in region.nodes]
    return {
        "server_name": community.name,
        "listen": hostport(mesh.host, community.client_port),
        "http": hostport(mesh.host, community.monitor_port),
        "accounts": {mesh.account: {"users": users(community.roles(), mesh.domain, mesh.reply_window, local=False)}},
        "leafnodes": {
            "remotes": [
                {
                    "urls": urls,
                    "account": mesh.account,
                    "seed": Include(f"{SECRETS_DIR}/leaf-{community.name}.conf"),
                }
            ]
        },
    }


def _urlhost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def node_config(topology: Topology, name: str, data_dir: Path) -> str:
    """The rendered config of the hub node or community leaf called *name*."""
    found = topology.node(name)
    header = (
        f"meshjobs mesh {topology.mesh.name!r}: {name}\n"
        "generated by `meshjobs broker config` from the topology file; edit the topology, not this file"
    )
    if isinstance(found, tuple):
        return render(hub_node(topology, found[0], found[1], data_dir), header=header)
    return render(leaf_node(topology, found), header=header)
