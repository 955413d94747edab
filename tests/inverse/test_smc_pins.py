"""``sample_smc`` gives the results it gave before it was split into named steps (issue 14).

``smc_pins.safetensors`` / ``smc_pins.json`` were written by ``python -m tests.inverse._smc_pins`` from
the 696-line sampler (commit 0814388), at 1 thread. On that machine the split sampler reproduced them bit
for bit (every tensor ``torch.equal``, every info value equal); at 2 threads with AVX2-limited MKL/ATen the
old and the new sampler also agreed bit for bit with each other, while both differ from the 1-thread pins
in the last bits (another BLAS path). So the floats are compared at ``1e-9`` relative; every integer
(resampling steps, distinct survivors, network calls, backward passes) and every name must match
exactly, so a changed decision fails however small its numerical effect. The pinned info gained two keys by
hand since: ``kernels: "reference"`` (issue 19's kernel choice, recorded in ``sampler_info``) and
``decoder_var: None`` (issue 15: a latent prior's decoder-error model; None where not given).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.inverse._smc_pins import CASES, PIN_INFO, PINS, info_of, tensors_of

_PINNED = json.loads(PIN_INFO.read_text())


def _same_info(new: object, old: object, where: str) -> None:
    if isinstance(old, dict):
        assert isinstance(new, dict) and set(new) == set(old), (where, sorted(new), sorted(old))  # type: ignore[arg-type]
        for key in old:
            _same_info(new[key], old[key], f"{where}.{key}")  # type: ignore[index]
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _same_info(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and not isinstance(new, bool):
        assert isinstance(new, int | float), where
        assert math.isclose(new, old, rel_tol=1e-9, abs_tol=1e-12), (where, new, old)
    else:
        assert new == old, (where, new, old)


@pytest.mark.parametrize("name", sorted(CASES))
def test_smc_reproduces_the_pinned_results(name: str) -> None:
    from safetensors.torch import load_file

    pinned = {k.split("/", 1)[1]: v for k, v in load_file(str(PINS)).items() if k.startswith(f"{name}/")}
    res = CASES[name]()
    _same_info(info_of(res), _PINNED[name], name)
    new = tensors_of(res)
    assert set(new) == set(pinned)
    for key, value in new.items():
        torch.testing.assert_close(value, pinned[key], rtol=1e-9, atol=1e-12, msg=f"{name}/{key}")
