"""DDP on CPU: two gloo processes train on different batches, end with identical weights, and only rank 0
writes the checkpoint (which holds both ranks' random states)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medidiff.train import ddp
from medidiff.train.checkpoint import load_checkpoint

from .conftest import blob_batches, tiny_config

STEPS = 3


def _worker(rank: int, out_dir: str, probe_dir: str) -> None:
    from medidiff.train.loop import train

    info = ddp.dist_info("cpu")
    assert info.rank == rank and info.world_size == 2
    cfg = tiny_config(2, steps=STEPS, log_every=1, ckpt_every=STEPS, eval_batches=1)
    data = blob_batches(2, (16, 16), seed=10 + rank)  # each rank its own share
    result = train(cfg, data, out_dir, stage="autoencoder", progress=False)
    # every rank reports the weights of its own replica
    assert result.model is not None and result.ema_model is not None
    weights = {f"model.{k}": v.detach().clone() for k, v in result.model.state_dict().items()}
    weights |= {f"ema.{k}": v.detach().clone() for k, v in result.ema_model.state_dict().items()}
    save_file(weights, str(Path(probe_dir) / f"rank{rank}.safetensors"))
    assert result.step == STEPS
    assert ddp.gather_json({"rank": rank}, info) == [{"rank": 0}, {"rank": 1}]


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder).weights("model")


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path: Path) -> None:
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    ddp.launch_local(_worker, 2, str(out), str(probe))
    ckpt = load_checkpoint(out)
    assert ckpt.step == STEPS
    assert ckpt.training_state["world_size"] == 2
    rng = ckpt.training_state["rng"]
    assert len(rng) == 2 and rng[0]["generators"]["train"] != rng[1]["generators"]["train"]
    replicas = [load_file(str(probe / f"rank{r}.safetensors")) for r in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])
    # and rank 0 saved exactly those weights
    for part in ("model", "ema"):
        saved = ckpt.weights(part)
        assert all(torch.equal(saved[k], replicas[0][f"{part}.{k}"]) for k in saved)
    # ranks saw different data: a single-process run on rank 0's share ends elsewhere
    from medidiff.train.loop import train

    cfg = tiny_config(2, steps=STEPS, log_every=1, ckpt_every=STEPS, eval_batches=1)
    single = train(
        cfg, blob_batches(2, (16, 16), seed=10), tmp_path / "single", stage="autoencoder", progress=False
    )
    w_single, w_ddp = _final_weights(single.checkpoint), _final_weights(ckpt.path)
    assert any(not torch.equal(w_single[k], w_ddp[k]) for k in w_ddp)
    # only one set of outputs: no per-rank checkpoint folders or temporary leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ckpt-00000003", "latest", "metrics.jsonl", "provenance.prov.json"]
    )
