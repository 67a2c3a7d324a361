"""Which network interface the collectives of this node must use.

Why: gloo (and torch's TensorPipe) pick the address the machine's hostname resolves to, which on
Debian and Ubuntu is 127.0.1.1 (and 127.0.0.1 in many containers). Every rank then tells its peers
to connect to loopback, and a multi-node run dies before its first step with "Gloo
connectFullMesh failed ... Connection refused". NCCL picks the first interface that is up, often a
docker bridge. The fix is the interface variables (GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME) naming the interface that holds the address this node is reached at: the Ray
node address under `beitdist launch`, the route to MASTER_ADDR under torchrun. A variable the user
set is never touched.

Standard library only: the Ray worker setup hook uses it in every Ray process.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""gloo (CPU collectives), TensorPipe (RPC), NCCL (GPU collectives, its bootstrap and socket transport)."""
_SIOCGIFADDR = 0x8915
DEFAULT_ROUTE_PROBE = "192.0.2.1"
"""An address of TEST-NET-1 (never used): the route to it is the default route."""


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def _ipv6_of(name: str) -> list[str]:
    try:
        lines = open("/proc/net/if_inet6", encoding="ascii").read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[5] == name:
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def interface_for(address: str) -> str | None:
    """The name of the local interface that holds `address` (IPv4 or IPv6), or None."""
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        return None
    for _, name in socket.if_nameindex():
        if wanted.version == 4 and _ipv4_of(name) == str(wanted):
            return name
        if wanted.version == 6 and str(wanted) in _ipv6_of(name):
            return name
    return None


def route_source(peer: str, port: int = 9) -> str | None:
    """The local address this machine uses to reach `peer` (no packet is sent: a UDP connect only
    asks the routing table)."""
    try:
        infos = socket.getaddrinfo(peer, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, target in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.connect(target)
                return str(probe.getsockname()[0])
            except OSError:
                continue
    return None


def bind_collectives(address: str | None, environ: MutableMapping[str, str] | None = None,
                     cuda: bool = True) -> dict[str, str]:
    """Set the interface variables that are unset to the interface holding `address`; returns
    what was set. NCCL's only when `cuda`. Nothing when the address is on no interface (a NAT'd
    or unknown address): the libraries' own choice stays, and the log says why."""
    environ = os.environ if environ is None else environ
    if not address:
        return {}
    name = interface_for(address)
    if name is None:
        log.info("no local interface holds %s; collectives use the libraries' default interface", address)
        return {}
    chosen = {var: name for var in INTERFACE_VARIABLES
              if (cuda or var != "NCCL_SOCKET_IFNAME") and not environ.get(var)}
    environ.update(chosen)
    return chosen


_CONNECT_FAILURE = re.compile(r"connectFullMesh|Connection refused|Connection reset|No route to host|"
                              r"Network is unreachable|timed out.*connect|connect.*timed out", re.IGNORECASE)
_ADDRESSES = re.compile(r"(?:local|remote)=\[?([0-9A-Fa-f.:]+?)\]?:(\d+)")


def rendezvous_hint(message: str) -> str | None:
    """One line for a collective connect failure: the addresses tried and the variables to set;
    None for other failures."""
    if not _CONNECT_FAILURE.search(message):
        return None
    tried = sorted({f"{host}:{port}" for host, port in _ADDRESSES.findall(message)})
    where = f" (addresses tried: {', '.join(tried)})" if tried else ""
    loopback = any(t.startswith("127.") for t in tried)
    why = "; a rank advertised a loopback address: its hostname resolves to 127.x" if loopback else ""
    return (f"the ranks could not connect to each other{where}{why}; on every node set GLOO_SOCKET_IFNAME "
            f"(NCCL_SOCKET_IFNAME on GPUs) to the interface that holds the node's address, e.g. "
            f"`GLOO_SOCKET_IFNAME=eth0`, and check that the nodes accept connections on any port from each other")


def _is_loopback_interface(name: str) -> bool:
    address = _ipv4_of(name)
    return name == "lo" or (address is not None and ipaddress.ip_address(address).is_loopback)


def loopback_problem(world_size: int, local_world_size: int, environ: MutableMapping[str, str] | None = None
                     ) -> str | None:
    """Before gloo connects a run that spans nodes: the one line for an interface its peers can
    never reach (loopback: GLOO_SOCKET_IFNAME=lo, or no variable and a hostname that resolves to
    127.x). gloo itself would retry the refused connections until the process-group timeout."""
    environ = os.environ if environ is None else environ
    if local_world_size >= world_size:
        return None
    name = environ.get("GLOO_SOCKET_IFNAME")
    if name:
        if not _is_loopback_interface(name.split(",")[0]):
            return None
        what = f"GLOO_SOCKET_IFNAME={name} is a loopback interface"
    else:
        try:
            address = socket.gethostbyname(socket.gethostname())
        except OSError:
            return None
        if not ipaddress.ip_address(address).is_loopback:
            return None
        what = f"no GLOO_SOCKET_IFNAME is set and this host's name resolves to {address}"
    return (f"the ranks could not connect to each other: this run spans nodes ({local_world_size} of "
            f"{world_size} ranks here) but {what}, which the other nodes cannot reach; set GLOO_SOCKET_IFNAME "
            f"to the interface that holds this node's address (e.g. `GLOO_SOCKET_IFNAME=eth0`) on every node")
