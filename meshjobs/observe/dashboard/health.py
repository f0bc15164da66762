"""Servers, regions, communities and federation links, from the servers' monitoring endpoints.

Two sources, one shape (see :func:`from_topology` and :func:`from_monitors`):

- a topology file: every hub node and community leaf it names, checked as
  ``meshjobs mesh status`` checks them (expected routes, gateways, leaf links
  and JetStream meta group), so a missing link is a problem;
- monitoring URLs (``--monitor``): whatever each server says about itself
  (``/varz``, ``/routez``, ``/gatewayz``, ``/leafz``); a server that does not
  answer is a problem, links are shown as reported.

These calls block (urllib); the dashboard runs them in a thread.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from meshjobs.envelope import now_ms
from meshjobs.errors import UsageError
from meshjobs.infra.mesh import check_health
from meshjobs.infra.topology import Topology

MAX_MONITOR_BYTES = 4 * 1024 * 1024


def check_monitor_url(url: str) -> str:
    """A monitoring base URL (``http://host:8222``), without a trailing slash; raises :class:`UsageError`."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise UsageError(f"--monitor {url[:60]!r}: expected a URL like http://127.0.0.1:8222")
    return url.rstrip("/")


def _get(base: str, path: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/{path}", timeout=timeout) as response:
        data = json.loads(response.read(MAX_MONITOR_BYTES))
    if not isinstance(data, dict):
        raise ValueError(f"/{path} did not answer a JSON object")
    return data


def _names(items: Any, key: str) -> list[str]:
    if not isinstance(items, list):
        return []
    return sorted({str(i.get(key, "")) for i in items if isinstance(i, dict)} - {""})


def probe(base: str, timeout: float = 1.0) -> dict[str, Any]:
    """One server as its monitoring endpoint describes it (``up`` False, with the problem, when it does not)."""
    server: dict[str, Any] = {"name": base, "url": base, "up": False, "problems": [], "role": "server", "region": ""}
    server.update(community="", version="", connections=0, routes=[], gateways=[], leafs=[], leafnodes=0)
    server.update(jetstream="", meta_leader="")
    try:
        varz = _get(base, "varz", timeout)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        server["problems"].append(f"monitoring endpoint does not answer ({exc})")
        return server
    server["up"] = True
    try:
        server["name"] = str(varz.get("server_name") or varz.get("server_id") or base)
        server["version"] = str(varz.get("version", ""))
        server["connections"] = int(varz.get("connections", 0))
        cluster, gateway = varz.get("cluster") or {}, varz.get("gateway") or {}
        server["region"] = str(gateway.get("name") or cluster.get("name") or "")
        jetstream = varz.get("jetstream") or {}
        server["jetstream"] = str((jetstream.get("config") or {}).get("domain", "")) if jetstream.get("config") else ""
        server["meta_leader"] = str((jetstream.get("meta") or {}).get("leader", ""))
        server["routes"] = _names(_get(base, "routez", timeout).get("routes"), "remote_name")
        server["gateways"] = sorted(_get(base, "gatewayz", timeout).get("outbound_gateways") or {})
        leafz = _get(base, "leafz", timeout)
        server["leafnodes"] = int(leafz.get("leafnodes", 0))
        server["leafs"] = _names(leafz.get("leafs"), "name")
    except (OSError, urllib.error.URLError, ValueError, TypeError, AttributeError) as exc:
        server["problems"].append(f"monitoring endpoint failed: {exc}")
    return server


def from_monitors(urls: list[str], timeout: float = 1.0) -> dict[str, Any]:
    """The servers behind *urls*, with the links they report."""
    servers = [probe(url, timeout) for url in urls]
    links = []
    for s in servers:
        links += [{"kind": "route", "a": s["name"], "b": r, "up": True} for r in s["routes"] if s["name"] < r]
        links += [{"kind": "gateway", "a": s["region"] or s["name"], "b": g, "up": True} for g in s["gateways"]]
        links += [{"kind": "leaf", "a": leaf, "b": s["name"], "up": True} for leaf in s["leafs"]]
    regions: dict[str, list[str]] = {}
    for s in servers:
        regions.setdefault(s["region"], []).append(s["name"])
    return _view("monitor", "", servers, regions, [], _unique(links))


def from_topology(topology: Topology) -> dict[str, Any]:
    """Every server the topology names, checked against the links it should have."""
    host = topology.mesh.host
    health = check_health(topology)
    ports = {n.name: n.monitor_port for r in topology.region for n in r.nodes}
    ports.update({c.name: c.monitor_port for c in topology.community})
    community_of = {c.name: c for c in topology.community}
    servers = []
    for s in health.servers:
        entry = s.as_dict()
        entry.update(url=f"http://{host}:{ports[s.name]}", leafs=[], version="", jetstream="")
        entry["community"] = s.name if s.name in community_of else ""
        servers.append(entry)
    by_name = {s["name"]: s for s in servers}
    links = []
    for region in topology.region:
        nodes = [n.name for n in region.nodes]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                up = b in by_name[a]["routes"] or a in by_name[b]["routes"]
                links.append({"kind": "route", "a": a, "b": b, "up": up})
        for other in topology.region:
            if region.name < other.name:
                up = any(other.name in by_name[n]["gateways"] for n in nodes)
                links.append({"kind": "gateway", "a": region.name, "b": other.name, "up": up})
    for community in topology.community:
        server = by_name[community.name]
        links.append({"kind": "leaf", "a": community.name, "b": community.region, "up": server["leafnodes"] >= 1})
    regions = {r.name: [n.name for n in r.nodes] for r in topology.region}
    communities = [{"name": c.name, "region": c.region, "server": c.name} for c in topology.community]
    return _view("topology", topology.mesh.name, servers, regions, communities, links)


def _unique(links: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for link in links:
        key = (link["kind"], *sorted((link["a"], link["b"])))
        if key not in seen:
            seen.add(key)
            out.append(link)
    return out


def _view(
    source: str,
    mesh: str,
    servers: list[dict[str, Any]],
    regions: dict[str, list[str]],
    communities: list[dict[str, Any]],
    links: list[dict[str, Any]],
) -> dict[str, Any]:
    for server in servers:
        server["healthy"] = bool(server["up"] and not server["problems"])
    return {
        "source": source,
        "mesh": mesh,
        "healthy": bool(servers) and all(s["healthy"] for s in servers),
        "servers": servers,
        "regions": [{"name": name, "servers": names} for name, names in regions.items()],
        "communities": communities,
        "links": links,
        "checked_ms": now_ms(),
    }
