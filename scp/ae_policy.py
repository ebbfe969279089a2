"""Who may associate: the called AE title must be ours, and the calling AE title (optionally bound to
host addresses or networks) must be on the allow-list when one is configured.

Pure decisions over plain values; :mod:`scp.association` turns a refusal into an A-ASSOCIATE-RJ.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics for source "DICOM UL service-user" (PS3.8 9.3.4)."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class CallingAE:
    """An allowed calling AE title, from any host when ``hosts`` is empty."""

    aet: str
    hosts: tuple[Network, ...] = ()

    def allows(self, address: str) -> bool:
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.hosts)


@dataclass(frozen=True)
class Refusal:
    reason: RejectReason
    message: str


@dataclass(frozen=True)
class AEPolicy:
    """The rules, built once from the settings."""

    our_aet: str
    accept_any_called_aet: bool = False
    calling: tuple[CallingAE, ...] = ()

    def check(self, calling_aet: str, called_aet: str, address: str) -> Refusal | None:
        """None when the association may go ahead, else why not."""
        calling_aet, called_aet = calling_aet.strip(), called_aet.strip()
        if not self.accept_any_called_aet and called_aet != self.our_aet.strip():
            return Refusal(RejectReason.CALLED_AE_NOT_RECOGNIZED,
                           f"called AE title {called_aet!r} is not ours ({self.our_aet!r})")
        if not self.calling:
            return None
        entries = [entry for entry in self.calling if entry.aet.strip() == calling_aet]
        if not entries:
            return Refusal(RejectReason.CALLING_AE_NOT_RECOGNIZED,
                           f"calling AE title {calling_aet!r} is not on the allow-list")
        if not any(entry.allows(address) for entry in entries):
            return Refusal(RejectReason.CALLING_AE_NOT_RECOGNIZED,
                           f"calling AE title {calling_aet!r} is not allowed from {address}")
        return None
