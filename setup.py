"""The compiled parts of vmimg (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vmimg.image._tarscan",
            sources=["vmimg/image/_tarscan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
        Extension(
            "vmimg.rootfs._slots",
            sources=["vmimg/rootfs/_slots.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
        Extension(
            "vmimg.rootfs._flatten",
            sources=["vmimg/rootfs/_flatten.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
        Extension(
            "vmimg.rootfs.writers._kernelhash",
            sources=["vmimg/rootfs/writers/_kernelhash.c"],
            depends=["vmimg/rootfs/writers/crc32c.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
        Extension(
            "vmimg.rootfs.writers.erofs._erofsmeta",
            sources=["vmimg/rootfs/writers/erofs/_erofsmeta.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
        Extension(
            "vmimg.rootfs.writers.ext4._ext4meta",
            sources=["vmimg/rootfs/writers/ext4/_ext4meta.c"],
            depends=["vmimg/rootfs/writers/crc32c.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
    ],
)
