"""Where an iSCSI target is: libiscsi's ``iscsi://`` URLs and the
``host:port`` portals a TargetAddress or a command line names, parsed once
for :class:`steelfusion.iscsi.client.IscsiClient` (and importable from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class IscsiUrl:
    """``iscsi://[user[%secret]@]host[:port]/target-iqn/lun`` (libiscsi's form)."""

    host: str
    port: int
    target: str
    lun: int
    user: str | None = None
    secret: str | None = field(default=None, repr=False)

    @property
    def portal(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ISCSI_PORT = 3260
"""The well-known (IANA) port of an iSCSI portal."""


def parse_url(url: str) -> IscsiUrl:
    """Parse a libiscsi-style URL; ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "iscsi" or not sep:
        raise ValueError(f"not an iscsi:// URL: {url!r}")
    if "?" in rest:
        raise ValueError("iscsi:// URL options are not supported")
    user = secret = None
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        user, has_secret, secret_part = cred.partition("%")
        secret = secret_part if has_secret else None
        if not user:
            raise ValueError("empty user name in the iscsi:// URL")
    hostport, _, path = rest.partition("/")
    target, slash, lun_text = path.rpartition("/")
    if not slash or not target or not lun_text.isascii() or not lun_text.isdigit():
        raise ValueError(f"iscsi:// URL needs /<target-iqn>/<lun>: {url!r}")
    host, port = split_portal(hostport)
    return IscsiUrl(host, port, target, int(lun_text), user, secret)


def split_portal(portal: str, default_port: int = ISCSI_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a TargetAddress's
    ``,tpgt`` tail is dropped) → (host, port)."""
    portal = portal.split(",", 1)[0]
    if portal.startswith("["):
        host, _, tail = portal[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif portal.count(":") == 1:
        host, _, port_text = portal.partition(":")
    else:
        host, port_text = portal, ""
    if not host:
        raise ValueError(f"no host in {portal!r}")
    if port_text and not (port_text.isascii() and port_text.isdigit()
                          and 0 < int(port_text) < 65536):
        raise ValueError(f"bad port in {portal!r}")
    return host, int(port_text) if port_text else default_port
