"""Client targets over several server replicas (docs/scaling.md).

Balancing is gRPC's own: a list of addresses becomes one gRPC target that the C
core resolves to every replica (its ``ipv4:``/``ipv6:`` multi-address syntax), a
``dns:///name:port`` target is resolved by gRPC's DNS resolver, and the channel's
service config names the load-balancing policy and turns on client-side health
checking (grpc.health.v1.Health/Watch), so that a replica reporting NOT_SERVING
gets no new calls. Nothing here picks replicas per call; this module only builds
the target and the service config, and lists the replicas for pinning.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

logger = logging.getLogger("splitlearn_comm.client")

#: The gRPC load-balancing policies a client may name.
POLICIES = ("pick_first", "round_robin")

#: How long the replicas found by resolving a ``dns:`` target are reused for pinning.
RESOLVE_TTL_S = 30.0

Address = Union[str, Sequence[str]]


def _split(address: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError naming the entry."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"replica address {address!r} is not 'host:port' with a port 1-65535 "
                         "(e.g. '10.0.0.7:50051', '[::1]:50051', 'replica-0.example:50051')")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "/[] ,"):
        raise ValueError(f"replica address {address!r} has an invalid host")
    return host, int(port)


def _ip(host: str) -> Optional[IP]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve_host(host: str, port: int) -> List[IP]:
    """The addresses of a host name, IPv4 first (a name's IPv6 addresses are used
    only when it has no IPv4 one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"replica host {host!r} does not resolve: {e}") from None
    ips: List[IP] = []
    for _family, _t, _p, _c, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in ips:
            ips.append(ip)
    v4: List[IP] = [ip for ip in ips if ip.version == 4]
    return v4 or ips


def multi_target(addresses: Sequence[str]) -> Tuple[str, List[str], bool]:
    """A gRPC target reaching every address: ``ipv4:a:p,b:p`` (or ``ipv6:``).

    Host names are resolved here, once; for names that should be re-resolved use a
    ``dns:///name:port`` target. Returns (target, replicas as "host:port", whether
    any entry was a host name)."""
    if isinstance(addresses, (str, bytes)) or not addresses:
        raise ValueError("server_address must be 'host:port', a gRPC target, or a non-empty "
                         "list of 'host:port' replica addresses")
    endpoints: List[Tuple[IP, int]] = []
    named = False
    for entry in addresses:
        if not isinstance(entry, str):
            raise TypeError(f"replica addresses must be strings, got {entry!r}")
        host, port = _split(entry.strip())
        ip = _ip(host)
        ips = [ip] if ip is not None else _resolve_host(host, port)
        named = named or ip is None
        for one in ips:
            if (one, port) not in endpoints:
                endpoints.append((one, port))
    if all(ip.version == 4 for ip, _ in endpoints):
        return ("ipv4:" + ",".join(f"{ip}:{port}" for ip, port in endpoints),
                [f"{ip}:{port}" for ip, port in endpoints], named)
    # a mix: IPv4 addresses as IPv4-mapped IPv6 ones (Linux dual-stack sockets reach them)
    as6 = [(ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip, port)
           for ip, port in endpoints]
    return ("ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in as6),
            [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip, port in endpoints],
            named)


def service_config(policy: str, health_check: bool = True) -> str:
    """The channel's service config (JSON): the load-balancing policy and, with
    round_robin, client-side health checking of the whole server ("")."""
    config: dict[str, Any] = {"loadBalancingConfig": [{policy: {}}]}
    if health_check and policy == "round_robin":
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config, separators=(",", ":"))


def default_policy(address: Address) -> str:
    """round_robin for a list of several addresses and for ``dns:`` targets (a name
    that may stand for many replicas); pick_first for one address."""
    if isinstance(address, str):
        return "round_robin" if address.startswith("dns:") else "pick_first"
    return "round_robin" if len(address) > 1 else "pick_first"


class Replicas:
    """The replica addresses behind a client's target, for pinning.

    A list (or an ``ipv4:``/``ipv6:`` target) is fixed; a ``dns:`` target is resolved
    with the system resolver when asked and reused for ``RESOLVE_TTL_S`` seconds;
    any other target is one replica."""

    def __init__(self, target: str, fixed: Optional[List[str]] = None) -> None:
        self._target = target
        self._fixed = fixed
        self._lock = threading.Lock()
        self._cached: List[str] = []
        self._expires = 0.0

    def get(self) -> List[str]:
        if self._fixed is not None:
            return list(self._fixed)
        t = self._target
        if t.startswith(("ipv4:", "ipv6:")):
            return [a for a in t.split(":", 1)[1].split(",") if a]
        if not t.startswith("dns:"):
            return [t]
        with self._lock:
            if time.monotonic() < self._expires and self._cached:
                return list(self._cached)
        name = t[len("dns:"):]
        if name.startswith("//"):  # dns://authority/name:port
            name = name[2:].split("/", 1)[1] if "/" in name[2:] else ""
        host, port = _split(name)
        ips = _resolve_host(host, port)
        found = [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in ips]
        with self._lock:
            self._cached, self._expires = found, time.monotonic() + RESOLVE_TTL_S
        return list(found)
