"""vmimg: turn container images into VM-ready, boot-verified artifacts."""

__version__ = "0.1.0"
