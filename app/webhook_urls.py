"""Where webhooks may go, and with what secret: the checks on the webhook settings and URLs.

The operator's WEBHOOK_URL is called wherever it points. A job's own `metadata.webhook_url` is
called only when its host is on WEBHOOK_ALLOWED_HOSTS: a host listed by name (or address) is
trusted as it is; "*" admits any other host whose addresses are all public, so that a job owner
cannot make the server call into its own network. Such a host's name is resolved again at every
delivery and the request goes to the very address that was checked (`destination`), so a name
that rebinds to a private address after the job was created gets nowhere.
"""

import base64
import binascii
import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

if TYPE_CHECKING:
    from app.config import Settings

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # the Standard Webhooks spec's floor for a signing key
MAX_URL_LENGTH = 2000  # WebhookDelivery.url's column
ANY_PUBLIC_HOST = "*"


class Refused(Exception):
    """The URL may not be called. `retry`: the refusal may pass later (its name did not resolve)."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


def secret_key(secret: str) -> bytes:
    """The signing key of a "whsec_<base64>" secret (the prefix is optional). ValueError if it is not
    base64 of at least MIN_SECRET_BYTES bytes."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("WEBHOOK_SECRET must be 'whsec_' followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"WEBHOOK_SECRET must encode at least {MIN_SECRET_BYTES} bytes (it has {len(key)})")
    return key


def webhook_settings_problem(url: str | None, secret: str | None, allowed_hosts: str) -> str | None:
    """What is wrong with these settings together, or None."""
    if secret is not None:
        try:
            secret_key(secret)
        except ValueError as exc:
            return str(exc)
    elif url or allowed_hosts.strip():
        return "WEBHOOK_URL and WEBHOOK_ALLOWED_HOSTS need WEBHOOK_SECRET: every webhook is signed"
    if url and (problem := shape_problem(url)):
        return f"WEBHOOK_URL {problem}"
    return None


def _host(parts: SplitResult) -> str:
    return (parts.hostname or "").rstrip(".")  # urlsplit lower-cases it and drops an IPv6 literal's brackets


def shape_problem(url: str) -> str | None:
    """What makes this string no webhook URL at all, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it: a port out of range raises)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not _host(parts):
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (put a token in its path or query instead)"
    return None


def allowed_hosts(setting: str) -> frozenset[str]:
    return frozenset(entry.strip().lower().strip("[]").rstrip(".") for entry in setting.split(",") if entry.strip())


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix: its last 32 bits are the IPv4 address
# IPv4-compatible addresses (deprecated), local-use NAT64 (where the IPv4 address sits depends on the
# network's own prefix length) and Teredo (a client behind NAT): all may reach IPv4 hosts, and no
# public webhook needs them.
REFUSED_V6 = tuple(ipaddress.IPv6Network(net) for net in ("::/96", "64:ff9b:1::/48", "2001::/32"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to this IPv6 address reaches through a translator or tunnel, if any."""
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour  # ::ffff:127.0.0.1 is 127.0.0.1; 2002:7f00:1:: goes through it


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("%eth0") names no other address
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in REFUSED_V6):
            return False
        ip = _embedded_ipv4(ip) or ip
    return _is_global(ip)


def resolve(host: str, port: int) -> list[str]:
    """The addresses a connection to this host would use (an address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"host {host} does not resolve ({exc})", retry=True) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def destination(url: str, settings: "Settings") -> str | None:
    """Where to send a delivery to `url`: None to connect by its name as usual (WEBHOOK_URL, or a
    host listed by name), else the public address to connect to. Raises Refused."""
    if problem := shape_problem(url):
        raise Refused(f"the URL {problem}")
    if url == settings.webhook_url:
        return None
    parts = urlsplit(url)
    host, hosts = _host(parts), allowed_hosts(settings.webhook_allowed_hosts)
    if host in hosts:
        return None
    if ANY_PUBLIC_HOST not in hosts:
        raise Refused(f"host {host} is not on WEBHOOK_ALLOWED_HOSTS")
    addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    if private := [address for address in addresses if not is_public(address)]:
        raise Refused(f"host {host} has a private, loopback or otherwise non-public address ({private[0]}); "
                      "list it on WEBHOOK_ALLOWED_HOSTS to allow it")
    return addresses[0]


def webhook_url_problem(url: str, settings: "Settings") -> str | None:
    """Why a job may not carry this `metadata.webhook_url`, or None: for the API to call when a job
    is created (every delivery checks again)."""
    if not settings.webhook_secret:
        return "webhooks are off on this server (WEBHOOK_SECRET is not set)"
    try:
        destination(url, settings)
    except Refused as exc:
        return str(exc)
    return None
