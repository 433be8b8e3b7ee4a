"""``dtype="auto"``: bfloat16 exactly where the hardware computes it natively."""

from __future__ import annotations

import pytest

from tierserve.config import ModelConfig, auto_dtype


def test_auto_resolves_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open

    def fake_cpuinfo(flags):
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nflags\t\t: {' '.join(flags)}\n")
        return lambda name, *a, **k: real_open(path if name == "/proc/cpuinfo" else name, *a, **k)

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(builtins, "open", fake_cpuinfo(["fpu", "avx2", "avx512f", "avx512_bf16"]))
    assert auto_dtype() == "bfloat16"
    monkeypatch.setattr(builtins, "open", fake_cpuinfo(["fpu", "avx2", "amx_bf16"]))
    assert auto_dtype() == "bfloat16"
    monkeypatch.setattr(builtins, "open", fake_cpuinfo(["fpu", "avx2", "avx512f"]))
    assert auto_dtype() == "float32"
    assert ModelConfig(dtype="auto").dtype == "float32"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float32, bfloat16, float16 or auto"):
        ModelConfig(dtype="int3")
