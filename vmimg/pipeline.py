"""`vmimg build`, end to end: the orchestration above the pipeline's stages.

One platform: build the bundle (bundle/build.py), with its launchers (boot/launchers.py),
optionally looked up first in the image's registry by its build key (`--remote-cache`)
and pushed afterwards (`--push`). Several platforms: one bundle per platform in
OUTPUT/ARCH, and with `--push` an OCI index over their artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmimg.artifact.bundle import (
    find_remote_bundle,
    pull_bundle_to_cache,
    push_bundle,
    push_bundle_index,
)
from vmimg.artifact.transfer import PushResult
from vmimg.boot.launchers import write_launchers
from vmimg.bundle.build import BuildOptions, BuildResult, build_bundle, bundle_key_for
from vmimg.errors import UsageError
from vmimg.image.cache import Cache
from vmimg.image.fetch import PhaseStart
from vmimg.image.image import Image
from vmimg.image.oci import parse_platform
from vmimg.image.reference import parse_reference
from vmimg.image.sources import SourceOptions, open_image


@dataclass
class RemoteBuild:
    build: BuildResult
    key: str
    pulled_from: str | None  # the artifact the bundle came from, if the remote cache hit
    pushed: PushResult | None


def compute_build_key(
    image: Image, options: BuildOptions, cache: Cache, phases: PhaseStart | None = None
) -> str:
    """The key `vmimg build` gives this image and options (bundle.bundle_key_for)."""
    return bundle_key_for(image, options, cache, phases).key


def build_bundle_remote(
    source: str,
    dest: str,
    options: BuildOptions,
    cache: Cache,
    source_options: SourceOptions,
    *,
    use_cache: bool = True,
    remote_cache: bool = False,
    push: str | None = None,
    phases: PhaseStart | None = None,
) -> RemoteBuild:
    """`vmimg build` with `--remote-cache` and/or `--push REF`.

    With the remote cache, a bundle that is neither in the local cache nor built
    before is looked up in the source image's repository by its build key and
    pulled into the local bundle cache, so build_bundle finds it there and
    converts nothing. With push, the finished bundle goes to `push` with the
    build key on its manifest, which is what later remote-cache lookups find.
    """
    parsed = parse_reference(source)
    with open_image(parsed, cache, source_options) as image:
        key = compute_build_key(image, options, cache, phases)
        digest = image.digest
    pulled_from = None
    local = os.path.join(cache.output_dir(key), "bundle", "vm.json")
    if remote_cache and use_cache and parsed.registry is not None and not os.path.isfile(local):
        pinned = f"{parsed.registry.registry}/{parsed.registry.repository}@{digest}"
        pulled_from = find_remote_bundle(pinned, key, source_options)
        if pulled_from is not None:
            pull_bundle_to_cache(
                pulled_from, cache, source_options, cache.output_dir(key), phases=phases
            )
    result = build_bundle(
        source, dest, options, cache, source_options, use_cache, phases, write_launchers
    )
    pushed = push_bundle(dest, push, cache, source_options, key, phases) if push else None
    return RemoteBuild(result, key, pulled_from, pushed)


@dataclass
class PlatformsBuild:
    bundles: list[BuildResult]
    pushed: str | None  # HOST/REPO@DIGEST of the index, with --push


def build_platforms(
    source: str,
    output: str,
    options: BuildOptions,
    cache: Cache,
    platforms: dict[str, SourceOptions],
    *,
    use_cache: bool = True,
    push: str | None = None,
    phases: PhaseStart | None = None,
) -> PlatformsBuild:
    """`vmimg build --platform A,B`: one bundle per platform in OUTPUT/ARCH, and with
    `push` one artifact per platform plus an OCI index over them."""
    os.makedirs(output, exist_ok=True)
    results = [
        build_bundle(
            source,
            os.path.join(output, parse_platform(plat).architecture),
            options,
            cache,
            sopts,
            use_cache=use_cache,
            phases=phases,
            finish=write_launchers,
        )
        for plat, sopts in platforms.items()
    ]
    pushed = None
    if push:
        first = next(iter(platforms.values()))
        index = push_bundle_index([r.bundle for r in results], push, cache, first, phases)
        pushed = f"{index.reference.rsplit(':', 1)[0]}@{index.digest}"
    return PlatformsBuild(results, pushed)


def build_one(
    source: str,
    dest: str,
    options: BuildOptions,
    cache: Cache,
    source_options: SourceOptions,
    *,
    use_cache: bool = True,
    phases: PhaseStart | None = None,
) -> BuildResult:
    """`vmimg build` of one platform, with the bundle's launchers."""
    return build_bundle(
        source, dest, options, cache, source_options, use_cache, phases, write_launchers
    )


def check_platforms_options(remote_cache: bool) -> None:
    if remote_cache:
        raise UsageError("--remote-cache takes one platform at a time")
