"""Who a request speaks for. (Networks and campaigns are read through the models of
:mod:`callingest.config_file`, as every service reads them.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for: a network, and optionally only some of its advertisers."""

    network_id: str
    advertisers: frozenset[str] | None

    def may_use(self, advertiser_id: str) -> bool:
        """True for a network-wide token or one scoped to ``advertiser_id``."""
        return self.advertisers is None or advertiser_id in self.advertisers
