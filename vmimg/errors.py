"""vmimg's exceptions. The CLI turns each into a one-line message and an exit code.

Every message names the thing at fault (a reference, a layer digest, a path in
a layer) so that the one line is enough to act on.
"""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for a Ctrl-C


class VmimgError(Exception):
    """Base of every error vmimg reports to the user."""

    exit_code = 1


class UsageError(VmimgError):
    """A bad option or argument the CLI could not catch by itself."""

    exit_code = 2


class ImageRefError(VmimgError):
    """An image reference that cannot be parsed, or names a missing image."""

    exit_code = 3


class SourceError(VmimgError):
    """An image source (registry, layout, archive, daemon) failed or lied."""

    exit_code = 4


class AuthError(SourceError):
    """The registry refused our credentials, or wanted some we do not have."""


class PlatformError(SourceError):
    """No manifest in an index matches the requested platform."""


class DigestError(SourceError):
    """Content does not match the digest or size its descriptor promised."""


class LayerError(VmimgError):
    """A layer cannot be decoded, or one of its entries is unacceptable."""

    exit_code = 5


class TreeError(LayerError):
    """An operation on the flattened tree is impossible (path escapes, missing parent)."""


class ContentError(VmimgError):
    """File content could not be read back from the cache."""

    exit_code = 6


class WriterError(VmimgError):
    """A file system writer cannot produce an image from this tree and options."""

    exit_code = 7


class VerityError(WriterError):
    """A dm-verity hash tree cannot be made for this image (its size, the salt)."""


class CacheError(VmimgError):
    """The cache directory is unusable."""

    exit_code = 8


class KernelError(VmimgError):
    """A kernel build or kernel lookup failed."""

    exit_code = 9


class BootError(VmimgError):
    """A VM could not be started or did not behave."""

    exit_code = 10


class AgentError(VmimgError):
    """The init agent cannot be found, configured or injected."""

    exit_code = 11


class VerificationFailed(VmimgError):
    """A bundle booted but did not pass verification."""

    exit_code = 12


class BundleError(VmimgError):
    """A bundle (a directory or a pulled artifact) is not in the format, or its files do
    not match what its vm.json lists."""

    exit_code = 13


def root_cause(e: BaseException) -> BaseException:
    """The innermost reason of an error that wraps others, as requests, urllib3 and the
    Docker SDK do (e.g. the gaierror or the ConnectionRefusedError under MaxRetryError and
    NewConnectionError)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException) and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]
        inner = inner if isinstance(inner, BaseException) else e.__cause__ or e.__context__
        if inner is None:
            return e
        e = inner
    return e
