"""Prefect flow for the train stage: one task per training stage, checkpoints between them.

Run it once::

    python -m flows.train configs/model_demo.yaml configs/data_demo.yaml runs/demo

A task that fails with a transient error (I/O, a lost or busy GPU, a killed worker) is retried,
and a retry, like a rerun of the whole flow, calls :func:`medidiff.stages.train.train_stage` on the
same run folder, which continues from the stage's latest checkpoint (``<out>/<stage>/latest``)
instead of starting again. Configuration errors and diverged training are not retried.
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medidiff.stages.train import planned_stages, train_stage


def _retry_transient(task, task_run, state) -> bool:
    """Retry I/O and runtime failures (the retry resumes); never bad configs or diverged training."""
    from medidiff.train.loop import NonFiniteLossError

    try:
        state.result()
    except NonFiniteLossError:
        return False  # resuming would replay the same steps into the same NaN
    except (OSError, RuntimeError):
        return True
    except Exception:
        return False
    return False


@task(
    name="train-stage",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,  # resuming is the library's job: it reads <out>/<stage>/latest
    task_run_name="train-{stage}",
)
def train_task(
    config: str,
    data_config: str,
    out_dir: str,
    stage: str,
    until_step: int | None = None,
    device: str | None = None,
    extend_to: int | None = None,
    nproc: int = 1,
) -> str:
    """Train (or resume, or extend) one stage; returns the path of its last checkpoint. ``nproc`` > 1
    launches ``torchrun`` with that many processes (one per GPU).

    ``config`` is the model YAML (a parameter named ``model_config`` would clash with pydantic,
    which Prefect uses to validate parameters).
    """
    if nproc > 1:  # one process per GPU (or CPU share) under torchrun: DDP replicas, rank 0 writes
        return _torchrun(config, data_config, out_dir, stage, until_step, device, extend_to, nproc)
    result = train_stage(
        config,
        data_config,
        out_dir,
        stage=stage,  # type: ignore[arg-type]
        until_step=until_step,
        extend_to=extend_to,
        device=device,
        progress=False,
    )
    return str(result[stage].checkpoint)


def _torchrun(
    config: str, data_config: str, out_dir: str, stage: str, until_step: int | None, device: str | None,
    extend_to: int | None, nproc: int,
) -> str:  # fmt: skip
    """``torchrun --nproc_per_node=N -m medidiff.cli train ...``; returns the stage's latest checkpoint."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "medidiff.cli", "train", config, data_config, out_dir, "--stage", stage]  # fmt: skip
    for flag, value in (("--until-step", until_step), ("--device", device), ("--extend-to", extend_to)):
        if value is not None:
            cmd += [flag, str(value)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"torchrun exited with {run.returncode}: {run.stderr[-2000:]}")
    latest = Path(out_dir) / stage / "latest"
    return str(latest.parent / latest.read_text().strip())


@flow(name="medidiff-train", log_prints=False)
def train_flow(
    config: str,
    data_config: str,
    out_dir: str,
    stage: str = "both",
    until_step: int | None = None,
    device: str | None = None,
    extend_to: int | None = None,
    nproc: int = 1,
) -> str:
    """Train the autoencoder, then the latent diffusion model on it (a pixel-space model: the diffusion
    model alone); returns the last checkpoint's path. ``extend_to`` trains a finished run of one
    stage on (see :func:`medidiff.stages.train.train_stage`)."""
    stages = planned_stages(config, stage)  # type: ignore[arg-type]
    if extend_to is not None and len(stages) != 1:
        raise ValueError("extend_to extends one stage: pass stage='autoencoder' or stage='latent'")
    ckpt = ""
    for st in stages:
        if st == "latent" and ckpt and _unfinished_autoencoder(ckpt):
            # the latent stage binds to one autoencoder checkpoint: started on an unfinished one (after
            # --until-step), the run could no longer be resumed. Train the autoencoder on first.
            break
        ckpt = train_task(config, data_config, out_dir, st, until_step, device, extend_to, nproc)
    return ckpt


def _unfinished_autoencoder(ckpt: str) -> bool:
    from medidiff.train.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    return ck.stage == "autoencoder" and ck.step < int(ck.config.training("autoencoder").steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="model YAML")
    p.add_argument("data_config")
    p.add_argument("out_dir")
    p.add_argument("--stage", default="both", choices=["autoencoder", "latent", "both"])
    p.add_argument("--until-step", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--extend-to", type=int, default=None)
    p.add_argument("--nproc", type=int, default=1, help="processes under torchrun (one per GPU)")
    a = p.parse_args()
    print(
        train_flow(a.config, a.data_config, a.out_dir, a.stage, a.until_step, a.device, a.extend_to, a.nproc)
    )


if __name__ == "__main__":
    main()
