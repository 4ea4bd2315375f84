"""Weight repacking is decided per CPU at start, can be forced, and is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import start_daemon
from lorad.daemon.repack import cpu_flags, decide


def test_auto_repacks_unless_the_cpu_has_amx() -> None:
    assert decide("auto", {"avx2", "fma"}).enabled
    choice = decide("auto", {"avx512f", "amx_tile", "amx_int8"})
    assert not choice.enabled and "amx_int8, amx_tile" in choice.reason
    assert decide("on", {"amx_tile"}).enabled
    assert not decide("off", {"avx2"}).enabled
    with pytest.raises(ValueError):
        decide("sometimes")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("mode", ["auto", "off", "on"])
def test_the_choice_is_reported_and_the_model_still_generates(
        tmp_path: Path, models_dir: Path, tiny_model: Path, mode: str) -> None:
    d = start_daemon(tmp_path, [models_dir], "--repack", mode)
    try:
        with d.client() as c:
            repack = c.capabilities()["repack"]
            assert repack["mode"] == mode
            assert repack["enabled"] == decide(mode).enabled
            with c.create_context(tiny_model, n_ctx=64) as ctx:
                text = ctx.generate("Hello world", max_tokens=4, temperature=0).collect()
            assert text
    finally:
        assert d.stop() == 0, d.log()
