"""The compiled parts of vmimg (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
CRC32C_H = "vmimg/rootfs/writers/crc32c.h"  # the kernel's CRC-32C, shared by two extensions


def c_extension(
    module: str, depends: tuple[str, ...] = (), libraries: tuple[str, ...] = ()
) -> Extension:
    """The extension `module` (vmimg.a.b._c), built from its own vmimg/a/b/_c.c, linked with
    the system `libraries` (their -dev packages are in scripts/debian-packages.txt)."""
    source = module.replace(".", "/") + ".c"
    return Extension(
        module,
        sources=[source],
        depends=list(depends),
        libraries=list(libraries),
        extra_compile_args=COMPILE_ARGS,
    )


setup(
    ext_modules=[
        c_extension("vmimg.image._tarscan"),
        c_extension("vmimg.image._zstdstream", libraries=("zstd",)),  # Debian's libzstd
        c_extension("vmimg.rootfs._slots"),
        c_extension("vmimg.rootfs._flatten"),
        c_extension("vmimg.rootfs._readplan"),
        c_extension("vmimg.rootfs.writers._kernelhash", depends=(CRC32C_H,)),
        c_extension("vmimg.rootfs.writers.erofs._erofsmeta"),
        c_extension("vmimg.rootfs.writers.ext4._ext4meta", depends=(CRC32C_H,)),
    ],
)
