"""Stage 6, registry artifacts: bundles and kernels pushed to and pulled from OCI registries."""
