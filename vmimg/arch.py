"""Guest architectures in one vocabulary.

vmimg names an architecture as its kernel does (`x86_64`, `arm64`): that is what vm.json,
`vmimg kernel --arch`, the kernel's `make ARCH=` and the kernel cache use. The outside world
spells the same two machines more ways, and each spelling is converted here and nowhere else:
OCI platforms and Debian (`amd64`, `arm64`), GNU triples, ELF, the agent's build directory and
QEMU (`x86_64`, `aarch64`).
"""

from __future__ import annotations

import enum
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class _Names:
    oci: str  # OCI platform architecture, also Debian's
    gnu: str  # GNU triples, ELF, QEMU, the agent's build directory
    elf_machine: int  # e_machine of its ELF binaries
    kernel_image: str  # the kernel image boot loaders take (arch/<dir>/boot/<image>)
    kernel_dir: str  # the kernel source's arch/<dir>
    qemu_package: str  # the Debian package with qemu-system-<gnu>


class Arch(enum.StrEnum):
    X86_64 = "x86_64"
    ARM64 = "arm64"

    @property
    def oci(self) -> str:
        """The OCI platform architecture (an image config's `architecture`); Debian's too."""
        return _NAMES[self].oci

    @property
    def gnu(self) -> str:
        """The GNU/ELF/QEMU name: the agent's build directory, qemu-system-<gnu>."""
        return _NAMES[self].gnu

    @property
    def qemu(self) -> str:
        """The QEMU program that emulates this arch."""
        return f"qemu-system-{self.gnu}"

    @property
    def qemu_package(self) -> str:
        """The Debian package that installs `qemu`."""
        return _NAMES[self].qemu_package

    @property
    def cross_prefix(self) -> str:
        """CROSS_COMPILE= for a kernel built on a host of another arch."""
        return f"{self.gnu}-linux-gnu-"

    @property
    def elf_machine(self) -> int:
        """e_machine of this arch's ELF binaries (vmlinux, the agent, busybox)."""
        return _NAMES[self].elf_machine

    @property
    def kernel_image(self) -> str:
        """The kernel image boot loaders take: bzImage, Image."""
        return _NAMES[self].kernel_image

    @property
    def kernel_dir(self) -> str:
        """The directory under the kernel source's arch/ (where boot/<kernel_image> is built)."""
        return _NAMES[self].kernel_dir

    @classmethod
    def parse(cls, name: str) -> Arch | None:
        """The Arch any vocabulary's `name` means, or None for one vmimg does not boot."""
        return _ALIASES.get(name.lower())

    @classmethod
    def from_kernel(cls, name: object) -> Arch | None:
        """The Arch of a kernel-vocabulary name only (vm.json, kernel.json, --arch)."""
        return next((a for a in cls if a.value == name), None)

    @classmethod
    def from_oci(cls, name: str) -> Arch | None:
        """The Arch of an OCI-vocabulary name only (amd64, arm64)."""
        return next((a for a in cls if a.oci == name), None)

    @classmethod
    def from_elf_machine(cls, machine: int) -> Arch | None:
        return next((a for a in cls if a.elf_machine == machine), None)

    @classmethod
    def host(cls) -> Arch | None:
        """This machine's arch, if vmimg knows it."""
        return cls.parse(platform.machine())


_NAMES = {
    Arch.X86_64: _Names("amd64", "x86_64", 62, "bzImage", "x86", "qemu-system-x86"),
    Arch.ARM64: _Names("arm64", "aarch64", 183, "Image", "arm64", "qemu-system-arm"),
}
_ALIASES = {
    **{a.value: a for a in Arch},
    **{a.oci: a for a in Arch},
    **{a.gnu: a for a in Arch},
    "x86-64": Arch.X86_64,
}
ARCHES = tuple(Arch)
# Other architectures' names that OCI platforms normalise (as containerd's platforms package
# does): 32-bit arm's Debian spellings.
_OCI_ONLY_ALIASES = {"armhf": "arm", "armel": "arm"}
# Every architecture an OCI platform may name (the image spec's list: Go's GOARCH values).
# Images for any of them can be flattened (vmimg rootfs, inspect); vmimg boots ARCHES.
OCI_ARCHITECTURES = (
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle",
    "ppc64", "ppc64le", "riscv64", "s390x", "wasm",
)  # fmt: skip


def oci_architecture(name: str) -> str:
    """The OCI spelling of any architecture name (`x86_64` -> `amd64`), lowercased; a name
    no vocabulary here knows is returned as it is (lowercased)."""
    lower = name.lower()
    known = Arch.parse(lower)
    return known.oci if known is not None else _OCI_ONLY_ALIASES.get(lower, lower)
