"""The sampling stages' precision and kernel choice (medidiff.stages._compute): resolved for the device before
any compute, falling back with a warning where the device lacks support, recorded as asked and as run."""

from __future__ import annotations

import pytest
import torch

from medidiff.stages._compute import resolve_compute


def test_what_the_device_supports_runs_as_asked() -> None:
    comp = resolve_compute("fp32", "compiled", "cpu")
    assert comp.kernels == "compiled" and comp.precision.name == "fp32" and comp.warnings == ()
    assert comp.record("the step") == {
        "precision": {"requested": "fp32", "used": "float32"},
        "kernels": {"requested": "compiled", "used": "compiled", "covers": "the step"},
    }
    bf16 = resolve_compute("bf16", "reference", "cpu")  # CPU bf16 autocast: on request
    assert bf16.precision.label == "bf16-mixed" and bf16.warnings == ()
    assert resolve_compute("auto", "reference", "cpu").record(None)["precision"] == {
        "requested": "auto",
        "used": "float32",
    }


def test_triton_on_a_cpu_without_the_interpreter_falls_back_to_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    comp = resolve_compute("auto", "triton", "cpu")
    assert comp.kernels == "compiled" and comp.kernels_requested == "triton"
    assert len(comp.warnings) == 1 and "using the compiled kernels instead" in comp.warnings[0]
    assert comp.record(None)["kernels"] == {"requested": "triton", "used": "compiled", "covers": None}


def test_bf16_on_a_card_without_it_falls_back_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA card without bf16 (pre-Ampere): sampling runs in float32 and says so (training still refuses)."""
    import medidiff.train.precision as precision

    monkeypatch.setattr(precision, "_cuda_bf16", lambda device: False)
    comp = resolve_compute("bf16", "reference", "cuda")
    assert comp.precision.name == "fp32" and comp.precision_requested == "bf16"
    assert len(comp.warnings) == 1 and "runs in float32 instead" in comp.warnings[0]
    assert comp.record(None)["precision"] == {"requested": "bf16", "used": "float32"}
    with pytest.raises(ValueError, match="does not support bf16"):
        precision.resolve_precision("bf16", "cuda")


def test_unknown_names_and_fp16_off_cuda_are_refused() -> None:
    with pytest.raises(ValueError, match="kernels must be one of reference, compiled, triton"):
        resolve_compute("fp32", "cuda", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_compute("fp8", "reference", "cpu")
    with pytest.raises(ValueError, match="fp16 training needs a CUDA device"):
        resolve_compute("fp16", "reference", torch.device("cpu"))
