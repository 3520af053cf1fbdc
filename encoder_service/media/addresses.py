"""Outbound address policy for media URLs (the SSRF rules).

Contract: ``resolve_public(host, port, allow_private, timeout_s)`` resolves a host name once and
returns the addresses the fetcher may connect to, or raises ``EncodeError(INVALID)`` when the host
does not resolve or any of its addresses is not globally routable, and ``EncodeError(TIMEOUT)``
when the resolver gives no answer within ``timeout_s``. The fetcher connects to the returned
address itself, so a second (rebinding) DNS answer is never used. URL parsing and HTTP do not
belong here.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket

from encoder_service.errors import invalid, timeout

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# 64:ff9b::/96 (NAT64) embeds an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# getaddrinfo cannot be interrupted, so it runs on these threads and the caller stops waiting at
# its timeout. A resolver that hangs keeps one of them busy until the system resolver gives up;
# the pool bounds how many can pile up (later lookups wait in line and time out in turn).
_RESOLVER_THREADS = 8
_resolver = concurrent.futures.ThreadPoolExecutor(_RESOLVER_THREADS, thread_name_prefix="resolve")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_blocked(ip: IPAddress) -> bool:
    """True for loopback, private, link-local, CGNAT, reserved, multicast, unspecified and
    IPv4-mapped addresses (and IPv6 forms embedding a blocked IPv4 address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return True  # ::ffff:a.b.c.d is an IPv4 socket in disguise; always refused
        inner = _embedded_ipv4(ip)
        if inner is not None and is_blocked(inner):
            return True
    # is_global is False for every IANA special-purpose block (RFC 1918, 100.64/10, 169.254/16,
    # 127/8, fc00::/7, fe80::/10, documentation and reserved ranges); multicast needs its own test.
    return ip.is_multicast or ip.is_unspecified or not ip.is_global


def _lookup(host: str, port: int) -> list[tuple]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


def resolve_public(host: str, port: int, allow_private: bool, timeout_s: float) -> list[str]:
    """Resolve ``host`` once (waiting at most ``timeout_s``); every address must pass the policy."""
    pending = _resolver.submit(_lookup, host, port)
    try:
        infos = pending.result(timeout=max(timeout_s, 0.0))
    except concurrent.futures.TimeoutError:
        pending.cancel()  # still queued behind hung lookups: never start it
        raise timeout(f"resolving host {host!r} timed out after {timeout_s:.1f}s") from None
    except (socket.gaierror, UnicodeError):
        raise invalid(f"cannot resolve host {host!r}") from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # NOTE: strip an IPv6 zone ("fe80::1%eth0") before parsing; the zone makes it link-local.
        text = str(sockaddr[0]).split("%", 1)[0]
        ip = ipaddress.ip_address(text)
        if not allow_private and is_blocked(ip):
            raise invalid(f"host {host!r} resolves to a non-public address ({ip}); refused")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise invalid(f"cannot resolve host {host!r}")
    return addresses
