# The vmimg toolchain as a container image: vmimg, its init agent, its guest kernel (built
# into the image's cache), QEMU for `vmimg verify`, and the tools to rebuild the kernel.
#
#   podman build --isolation chroot --network host --pull=never -t vmimg .
#   docker build -t vmimg .
#   docker run --rm --device /dev/kvm --group-add "$(stat -c %g /dev/kvm)" \
#       -v "$PWD:/work" vmimg build docker://registry.example/app:1.0 -o bundle
#
# Every stage starts from debian:bookworm-slim, so a build needs only that one image locally.
# Each stage installs only packages named in scripts/debian-packages.txt, and the runtime
# stage installs exactly the run-time subset of it (tests/test_dockerfile.py checks both).
# Build arguments:
#   PREBUILD_KERNEL=1   build the guest kernel into the image (about 3 minutes on 2 idle
#                       cores); 0 leaves it to the first `vmimg build` that needs it.
#   VMIMG_UID=1000      the uid of the image's non-root user.

# --- the init agent: a static musl binary ------------------------------------------------
FROM debian:bookworm-slim AS agent
# Debian's own package versions are the pin: the base image is bookworm.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc \
      libc6-dev \
      make \
      musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY agent/Makefile agent/Makefile
COPY agent/src agent/src
RUN make -C agent ARCH=x86_64

# --- vmimg in a venv ------------------------------------------------------------------------
FROM debian:bookworm-slim AS python
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc \
      libc6-dev \
      libzstd-dev \
      python3 \
      python3-dev \
      python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY vmimg vmimg
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (it stays out of the
# image): docker build --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=ca-certificates,target=/run/secrets/ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && python3 -m venv /opt/vmimg/venv \
 && /opt/vmimg/venv/bin/pip install --no-cache-dir --disable-pip-version-check /src

# --- the runtime ----------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="vmimg" \
      org.opencontainers.image.description="Turn container images into VM-ready, boot-verified artifacts" \
      org.opencontainers.image.licenses="Apache-2.0"

# What vmimg runs: python3 (itself), libzstd1 (its zstd layer decompressor links it),
# qemu-system-x86 (verify, run), busybox-static (sample), ca-certificates (registries over
# TLS), e2fsprogs and erofs-utils (to inspect and check its images by hand), and what
# `vmimg kernel build` needs: the pinned source (linux-source-6.1) and its build tools.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bc \
      bison \
      busybox-static \
      ca-certificates \
      e2fsprogs \
      erofs-utils \
      flex \
      gcc \
      libc6-dev \
      libelf-dev \
      libssl-dev \
      libzstd1 \
      linux-source-6.1 \
      lz4 \
      make \
      python3 \
      qemu-system-x86 \
      tar \
      xz-utils \
 && rm -rf /var/lib/apt/lists/*

ARG VMIMG_UID=1000
RUN useradd --create-home --uid "${VMIMG_UID}" --user-group --shell /bin/sh vmimg

COPY --from=python /opt/vmimg/venv /opt/vmimg/venv
COPY --from=agent /src/agent/build/x86_64/init /opt/vmimg/agent/x86_64/init
COPY kernels /opt/vmimg/kernels

# vmimg looks for the agent at vmimg/_agent/<arch>/init inside its package, and for the
# kernel fragments at kernels/ beside the package (vmimg/guest/kernel.py's FRAGMENTS_DIR): point
# both at /opt/vmimg.
RUN site="$(/opt/vmimg/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && ln -s /opt/vmimg/agent "${site}/vmimg/_agent" \
 && ln -s /opt/vmimg/kernels "${site}/kernels" \
 && install -d -o vmimg -g vmimg -m 0755 /var/cache/vmimg /work

ENV PATH=/opt/vmimg/venv/bin:${PATH} \
    VMIMG_CACHE=/var/cache/vmimg \
    LANG=C.UTF-8

# Numeric, so that a runtime can tell without /etc/passwd that this is not root.
USER ${VMIMG_UID}
WORKDIR /work

# Prove the layout (agent and fragments found), then build the kernel into the cache. The
# extracted source tree (about 1.3 GB) is dropped; the tarball stays for the cache key.
# The cache is opened to every uid, because CI systems run images as their own user.
ARG PREBUILD_KERNEL=1
RUN python -c 'from vmimg.guest.agent import find_agent_binary; print(find_agent_binary("x86_64"))' \
 && python -c 'from vmimg.guest.kernel import read_pin; print(read_pin())' \
 && if [ "${PREBUILD_KERNEL}" = 1 ]; then \
      vmimg kernel build \
      && rm -rf "${VMIMG_CACHE}"/kernels/sources/*/ "${VMIMG_CACHE}"/kernels/logs "${VMIMG_CACHE}"/tmp/*; \
    fi \
 && vmimg cache ls \
 && chmod -R a+rwX "${VMIMG_CACHE}"

ENTRYPOINT ["vmimg"]
CMD ["--help"]
