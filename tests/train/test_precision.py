"""Precision policy on CPU: fp32 by default, bf16 only on request, fp16 refused without CUDA."""

from __future__ import annotations

import pytest
import torch

from medidiff.train.precision import autocast_context, make_grad_scaler, resolve_precision


def test_cpu_auto_is_fp32() -> None:
    p = resolve_precision("auto", "cpu")
    assert p.name == "fp32" and p.autocast_dtype is None and not p.grad_scaler
    assert p.label == "float32"
    assert make_grad_scaler(p, "cpu") is None


def test_cpu_bf16_only_when_asked() -> None:
    p = resolve_precision("bf16", "cpu")
    assert p.name == "bf16" and p.autocast_dtype == torch.bfloat16 and not p.grad_scaler
    assert p.label == "bf16-mixed"
    assert make_grad_scaler(p, "cpu") is None
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast_context(p, "cpu"):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    # outside the region, and for fp32, everything stays float32
    assert lin(x).dtype == torch.float32
    with autocast_context(resolve_precision("fp32", "cpu"), "cpu"):
        assert lin(x).dtype == torch.float32


def test_fp16_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", "cpu")


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        resolve_precision("fp8", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_prefers_bf16() -> None:
    p = resolve_precision("auto", "cuda")
    assert p.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_precision("fp16", "cuda").grad_scaler
    assert make_grad_scaler(resolve_precision("fp16", "cuda"), "cuda") is not None
