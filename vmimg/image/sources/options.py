"""SourceOptions: what every transport is told besides the reference."""

from __future__ import annotations

from dataclasses import dataclass

from vmimg.image.credentials import Credentials
from vmimg.image.oci import Platform


@dataclass(frozen=True)
class SourceOptions:
    """Which platform to pick, and how to reach registries (as skopeo's options)."""

    platform: Platform
    insecure_hosts: tuple[str, ...] = ()  # plain http allowed (loopback hosts always are)
    ca_cert: str | None = None
    tls_verify: bool = True  # False: plain http allowed and certificates unchecked, everywhere
    authfile: str | None = None  # the primary auth file (else $REGISTRY_AUTH_FILE, ...)
    creds: Credentials | None = None  # --creds: used for creds_host only
    creds_host: str | None = None
