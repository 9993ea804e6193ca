"""Fuzz targets for the tar reader and the tar/cpio writers, driven by hypothesis.

CI runs a short pass. For a long run:

    VMIMG_FUZZ_EXAMPLES=200000 .venv/bin/pytest tests/fuzz -q -p no:cacheprovider

Failures are kept in .hypothesis/ and replayed first on the next run.
"""
