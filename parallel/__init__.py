"""Device mesh, expert parallelism and FSSDP wrappers around a model built by `moe/`.

Not built yet: see issue 4. Model code never imports this package.
"""
