"""Who is calling: the kernel's word for the peer of a local connection, and the access rule.

- Unix socket: ``SO_PEERCRED`` (uid, gid, pid at connect time) and ``SO_PEERGROUPS`` (the
  peer process's supplementary groups at connect time).
- Loopback TCP: the owner uid of the client's socket, from the kernel's socket diagnostics
  (``NETLINK_SOCK_DIAG``, ``inet_diag``, the interface ``ss -e`` uses), looked up by the exact
  address/port 4-tuple, IPv4 or IPv6. The kernel reports no process and no groups for a TCP
  socket, so the groups are those of the uid's account in the user database (its primary group
  and the groups that list it). No answer, no match, a peer that is not on loopback: no
  identity, so refused (fail closed).

Nothing a caller sends (headers, body) enters here. The rule (``AccessPolicy``): root, the
agent's own uid, or a member of one of the allowed groups.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from agent.errors import ConfigError
from agent.logs import quote

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
TCP_ALL_STATES = 0xFFFFFFFF
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_PEER_GROUPS = 256  # Python caps getsockopt buffers at 1024 bytes; more groups: ERANGE
DIAG_TIMEOUT = 1.0  # seconds the kernel has to answer (it answers at once)

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid: sport, dport
# (big-endian), src[16], dst[16], interface, cookie[2].
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode.
_DIAG_MSG_UID = struct.Struct("=II")
_DIAG_MSG_UID_OFFSET = 4 + 48 + 12
# TCP states (include/net/tcp_states.h) in which a client socket still belongs to a process
# that has it open. Once the process has closed it, the kernel keeps a time-wait entry (states
# TIME_WAIT, or FIN_WAIT2 as its sub-state) that reports uid 0 and inode 0: never an identity.
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT = 1, 4, 5, 8
OWNED_STATES = frozenset({TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT})
_UCRED = struct.Struct("=iII")  # pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """A caller as the kernel reports it; ``uid`` None means unknown (refused)."""

    listener: str  # "unix" or "tcp"
    uid: int | None
    gid: int | None = None
    pid: int | None = None
    groups: frozenset[int] = field(default_factory=frozenset)


# -- Unix socket ------------------------------------------------------------------------------


def unix_peer(sock: socket.socket) -> Peer:
    """The peer of an accepted Unix stream socket (credentials as of its ``connect``)."""
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return Peer("unix", None)
    groups = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, MAX_PEER_GROUPS * 4)
        groups.update(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass  # no SO_PEERGROUPS (kernel < 4.13) or over 256 groups: the primary group only
    return Peer("unix", uid, gid, pid or None, frozenset(groups))


# -- loopback TCP -----------------------------------------------------------------------------


def tcp_peer(
    client: tuple[str, int], server: tuple[str, int], groups_of: Callable[[int], frozenset[int]]
) -> Peer:
    """The owner of the client socket ``client`` connected to our ``server`` address."""
    try:
        client_ip = ipaddress.ip_address(client[0].split("%", 1)[0])
        server_ip = ipaddress.ip_address(server[0].split("%", 1)[0])
    except ValueError:
        return Peer("tcp", None)
    if isinstance(client_ip, ipaddress.IPv6Address) and client_ip.ipv4_mapped is not None:
        client_ip = client_ip.ipv4_mapped
    if isinstance(server_ip, ipaddress.IPv6Address) and server_ip.ipv4_mapped is not None:
        server_ip = server_ip.ipv4_mapped
    if not client_ip.is_loopback or client_ip.version != server_ip.version:
        return Peer("tcp", None)
    uid = socket_owner(client_ip, client[1], server_ip, server[1])
    if uid is None:
        return Peer("tcp", None)
    return Peer("tcp", uid, _primary_gid(uid), None, groups_of(uid))


def socket_owner(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dport: int,
) -> int | None:
    """The uid owning the TCP socket whose local end is src:sport and remote end dst:dport,
    asked of the kernel (``sock_diag``); None if it does not know one."""
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    request = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, TCP_ALL_STATES)
        + _SOCKID.pack(sport, dport, src.packed.ljust(16, b"\0"), dst.packed.ljust(16, b"\0"))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    seq = int(time.monotonic_ns() & 0xFFFFFFFF)
    message = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST, seq, 0) + request  # fmt: skip
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(DIAG_TIMEOUT)
            nl.sendto(message, (0, 0))
            answer = nl.recv(8192)
    except OSError:
        return None
    return _parse_owner(answer, seq)


def _parse_owner(answer: bytes, seq: int) -> int | None:
    offset = 0
    while offset + _NLMSGHDR.size <= len(answer):
        length, kind, _flags, answer_seq, _pid = _NLMSGHDR.unpack_from(answer, offset)
        if length < _NLMSGHDR.size or offset + length > len(answer):
            return None
        body = offset + _NLMSGHDR.size
        if answer_seq == seq:
            if kind == NLMSG_ERROR:
                return None  # e.g. -ENOENT: no such socket
            if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _DIAG_MSG_UID_OFFSET + 8:
                state = answer[body + 1]
                uid, inode = _DIAG_MSG_UID.unpack_from(answer, body + _DIAG_MSG_UID_OFFSET)
                if inode == 0 or state not in OWNED_STATES:
                    return None  # closed by its process (time-wait): owned by nobody now
                return int(uid)
        offset += (length + 3) & ~3
    return None


def _primary_gid(uid: int) -> int | None:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


class AccountGroups:
    """The groups of a uid's account in the user database (primary and supplementary),
    remembered for ``ttl`` seconds so a busy port does not read /etc/group per connection."""

    def __init__(self, ttl: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._known: dict[int, tuple[float, frozenset[int]]] = {}

    def __call__(self, uid: int) -> frozenset[int]:
        now = self._clock()
        known = self._known.get(uid)
        if known is not None and now - known[0] < self._ttl:
            return known[1]
        try:
            account = pwd.getpwuid(uid)
            groups = frozenset(os.getgrouplist(account.pw_name, account.pw_gid))
        except (KeyError, OSError):
            groups = frozenset()
        self._known[uid] = (now, groups)
        return groups


# -- the rule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call the endpoints that change state or return protected data."""

    allowed_gids: frozenset[int]
    group_names: tuple[str, ...]
    own_uid: int = field(default_factory=os.geteuid)

    @classmethod
    def from_setting(cls, value: str, *, explicit: bool = True) -> AccessPolicy:
        """``LOADER_ALLOWED_GROUPS``: comma-separated group names. Set explicitly, each must
        exist (``ConfigError`` otherwise: exit 2). The default names the package's group; on
        a machine without it (a developer's), nobody but root and the agent's own user is
        allowed, and a warning says so."""
        names = tuple(name.strip() for name in value.split(",") if name.strip())
        if not names:
            raise ConfigError("invalid setting LOADER_ALLOWED_GROUPS: names no group")
        gids, present = set(), []
        for name in names:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
                present.append(name)
            except KeyError:
                if explicit:
                    raise ConfigError(
                        f"invalid setting LOADER_ALLOWED_GROUPS: there is no group "
                        f"{quote(name, 64)} on this system"
                    ) from None
                logger.warning(
                    "group {} does not exist: only root and the agent's own user may load, "
                    "upload, log in or unlock (set LOADER_ALLOWED_GROUPS)",
                    quote(name, 64),
                )
        return cls(frozenset(gids), tuple(present))

    def allows(self, peer: Peer) -> bool:
        if peer.uid is None:
            return False
        return peer.uid in (0, self.own_uid) or bool(peer.groups & self.allowed_gids)

    def rule(self) -> str:
        if not self.group_names:
            return "root and the agent's own user"
        return f"root, the agent's own user, or members of {', '.join(self.group_names)}"


def identify(sock: socket.socket | None, groups_of: Callable[[int], frozenset[int]]) -> Peer:
    """The peer of an accepted connection, whichever kind of listener it came through."""
    if sock is None:
        return Peer("unknown", None)
    if sock.family == socket.AF_UNIX:
        return unix_peer(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            client = sock.getpeername()
            server = sock.getsockname()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            return Peer("tcp", None)
        return tcp_peer((client[0], client[1]), (server[0], server[1]), groups_of)
    return Peer("unknown", None)
