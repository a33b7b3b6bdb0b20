"""Session set-up shared by every test file."""

from __future__ import annotations


def pytest_sessionstart(session):
    """Compile every CPU kernel module before the first test, side by side (kernels.prebuild:
    a thread each, up to the CPU count). A fresh checkout otherwise compiles them one after
    another as tests first need them (~206 s on a 2-core Zen 3, where the side-by-side build
    takes ~110 s); already-built modules just load. A module that fails to build where this
    machine should build it stops the run."""
    from qwen35 import kernels

    if kernels.supported():
        modules = kernels.every_module()
        kernels.prebuild(modules)
        # with a toolchain here, a module this machine should build that did not (a compile
        # error) would otherwise only turn its tests into skips and the engine onto its PyTorch
        # fallbacks (without one, they skip saying so)
        broken = [n.source for n in modules if n.supported() and n.load() is None]
        if broken and _toolchain():
            import pytest

            pytest.exit(f"CPU kernels failed to build here: {', '.join(broken)} (the compiler's "
                        "output is in the log above; QWEN35_NO_KERNELS=1 tests the fallbacks)",
                        returncode=3)  # fmt: skip


def _toolchain() -> bool:
    """A C++ compiler and ninja, what torch's extension builder needs."""
    import shutil

    from torch.utils import cpp_extension

    return bool(cpp_extension.is_ninja_available() and shutil.which(cpp_extension.get_cxx_compiler()))
