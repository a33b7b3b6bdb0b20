"""Session set-up shared by every test file."""

from __future__ import annotations


def pytest_sessionstart(session):
    """Compile every CPU kernel module before the first test, side by side (kernels.prebuild:
    a thread each, up to the CPU count). A fresh checkout otherwise compiles them one after
    another as tests first need them (~206 s on a 2-core Zen 3, where the side-by-side build
    takes ~110 s); already-built modules just load."""
    from qwen35 import kernels

    if kernels.supported():
        kernels.prebuild(kernels.every_module())
