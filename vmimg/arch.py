"""Guest architectures in one vocabulary.

vmimg names an architecture as its kernel does (`x86_64`, `arm64`): that is what vm.json,
`vmimg kernel --arch` and the kernel cache use. The outside world spells the same two
machines three more ways, and each spelling is converted here and nowhere else:
OCI platforms (`amd64`, `arm64`), GNU triples, ELF and QEMU (`x86_64`, `aarch64`).
"""

from __future__ import annotations

import enum
import platform


class Arch(enum.StrEnum):
    X86_64 = "x86_64"
    ARM64 = "arm64"

    @property
    def oci(self) -> str:
        """The OCI platform architecture (an image config's `architecture`)."""
        return _OCI[self]

    @property
    def gnu(self) -> str:
        """The GNU/ELF/QEMU name: the agent's build directory, qemu-system-<gnu>."""
        return _GNU[self]

    @classmethod
    def parse(cls, name: str) -> Arch | None:
        """The Arch any vocabulary's `name` means, or None for one vmimg does not boot."""
        return _ALIASES.get(name.lower())

    @classmethod
    def host(cls) -> Arch | None:
        """This machine's arch, if vmimg knows it."""
        return cls.parse(platform.machine())


_OCI = {Arch.X86_64: "amd64", Arch.ARM64: "arm64"}
_GNU = {Arch.X86_64: "x86_64", Arch.ARM64: "aarch64"}
_ALIASES = {
    "x86_64": Arch.X86_64,
    "x86-64": Arch.X86_64,
    "amd64": Arch.X86_64,
    "arm64": Arch.ARM64,
    "aarch64": Arch.ARM64,
}
ARCHES = tuple(Arch)
# Every architecture an OCI platform may name (the image spec's list: Go's GOARCH values).
# Images for any of them can be flattened (vmimg rootfs, inspect); vmimg boots ARCHES.
OCI_ARCHITECTURES = (
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle",
    "ppc64", "ppc64le", "riscv64", "s390x", "wasm",
)  # fmt: skip
