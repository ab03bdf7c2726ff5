"""The engine's own C kernels are built once per source with the machine's C compiler, and skipped
(the torch routes take over) where there is none or the build fails."""

import importlib
import shutil

import pytest

from app.engine import c_kernels

KERNELS = [("int8_kernel", "AVX2"), ("int8_kernel", "AMX"), ("float_kernel", "FLOAT")]


@pytest.mark.parametrize(("module_name", "name"), KERNELS)
def test_each_own_kernel_is_built_once_with_the_c_compiler_and_skipped_without_one(module_name, name, monkeypatch,
                                                                                    tmp_path):
    module = importlib.import_module(f"app.engine.{module_name}")
    kernel = getattr(module, name)
    if not kernel.supported():
        pytest.skip(f"this CPU has not {name}'s instructions")

    def loaded() -> bool:
        c_kernels.library.cache_clear()
        module._library.cache_clear()
        return module._library(kernel) is not None if module_name == "int8_kernel" else module.available()

    monkeypatch.setattr(c_kernels, "CACHE_DIR", tmp_path)
    try:
        for compiler in ("no-such-cc", "false"):  # not found; found, but the build fails
            monkeypatch.setenv("CC", compiler)
            assert not loaded() and not list(tmp_path.iterdir())
        if shutil.which("cc") is None:
            pytest.skip("no C compiler here")
        monkeypatch.setenv("CC", "cc")
        assert loaded()
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith(kernel.name) and built[0].suffix == ".so"  # no partial build
        mtime = built[0].stat().st_mtime_ns
        assert loaded() and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        c_kernels.library.cache_clear()
        module._library.cache_clear()
