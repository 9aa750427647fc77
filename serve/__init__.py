"""Offloading, prefetching single-GPU inference runtime. Not built yet: see issue 6."""
