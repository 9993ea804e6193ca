"""Credentials for a registry, and the host whose API they are for: cheap to import, so
that SourceOptions and the CLI's --creds need not load the registry client (registry.py)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

DOCKER_HUB_HOSTS = ("docker.io", "registry-1.docker.io", "index.docker.io")
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)

    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


def api_host(registry: str) -> str:
    """Where the registry API of a reference's host name lives."""
    return DOCKER_HUB_API if registry in DOCKER_HUB_HOSTS else registry
