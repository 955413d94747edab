"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a folder ``<run_dir>/ckpt-<step:08d>/`` holding

- ``weights.safetensors``: the network (``model.*``), its EMA (``ema.*``) and, where the stage has
  them, the frozen autoencoder (``autoencoder.*``, latent stage) and the discriminator
  (``discriminator.*``); the file's metadata marks it as a medidiff checkpoint;
- ``optimizer.safetensors``: optimizer state tensors, flattened to ``<optimizer>.<param>.<key>``;
- ``checkpoint.json``: format tag and version, stage, step, the resolved :class:`ModelConfig`,
  SHA-256 of both tensor files, optimizer hyper-parameters, RNG states (as lists), data stream
  position, latent scale factor, data card reference and metrics;
- whatever the ``writers`` passed to :func:`save_checkpoint` add (the trainer adds the
  provenance record and the model card).

The folder is assembled under a temporary name and renamed into place, then the run's ``latest``
file (one line: the folder name) is replaced atomically, so ``latest`` always names a complete
checkpoint. :func:`load_checkpoint` refuses anything else with a message saying what it found.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

import medidiff
from medidiff.io.atomic import atomic_write_text, atomic_write_with, sha256_file
from medidiff.models.config import ModelConfig
from medidiff.seg.config import SegmenterConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INFO_FILE",
    "LATEST_FILE",
    "OPTIMIZER_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CheckpointError",
    "TrainedModels",
    "checkpoint_name",
    "flatten_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "load_models",
    "save_checkpoint",
    "unflatten_optimizer_state",
    "weights_metadata",
]

FORMAT = "medidiff-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
INFO_FILE = "checkpoint.json"
LATEST_FILE = "latest"
PARTS = ("model", "ema", "autoencoder", "discriminator")
STAGES = ("autoencoder", "latent", "segmenter")
_META_KEY = "medidiff"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A path that is not a readable medidiff checkpoint; the message says what was found."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimisation steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"ckpt-{step:08d}"


# ------------------------------------------------------------------------- optimizer state
def flatten_optimizer_state(
    state: Mapping[str, Any], prefix: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``<prefix>.<param>.<key>``) and JSON metadata.

    Returns:
        ``(tensors, meta)``; ``meta`` holds the param groups and the non-tensor state values.
    """
    if "." in prefix or not prefix:
        raise ValueError(f"optimizer name {prefix!r} must be non-empty and contain no '.'")
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if "." in key:
                raise ValueError(f"optimizer state key {key!r} contains '.'; cannot flatten it")
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{int(idx)}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(int(idx)), {})[key] = value
    groups = json.loads(json.dumps(state["param_groups"]))  # tuples -> lists; fails loudly on odd types
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` (a dict for ``optimizer.load_state_dict``)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        head, idx, key = name.split(".", 2)
        if head == prefix:
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        group = dict(g)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------- saving
_NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-0-9.eE+,\s]*?)\s*\]")


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats (e.g. the metrics of a NaN batch) replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_text(obj: Any) -> str:
    """Indented JSON with lists of numbers (RNG states) kept on one line each."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    return (
        _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", "", m.group(1)).replace(",", ", ") + "]", text) + "\n"
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write_with(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def weights_metadata(stage: str, step: int) -> dict[str, str]:
    """The safetensors metadata that marks a medidiff checkpoint file (see :func:`load_checkpoint`).

    One key: safetensors writes metadata from a hash map in no fixed order, and a byte-reproducible
    file gives a reproducible SHA-256 for provenance.
    """
    tag = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage, "step": int(step)}
    return {_META_KEY: json.dumps(tag, sort_keys=True)}


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    stage: str,
    step: int,
    config: ModelConfig | SegmenterConfig,
    weights: Mapping[str, Mapping[str, Tensor]],
    optimizers: Mapping[str, Mapping[str, Any]] | None = None,
    training_state: Mapping[str, Any] | None = None,
    latent_scale_factor: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    data_card: Mapping[str, Any] | None = None,
    writers: Sequence[Callable[[Path, dict[str, Any]], None]] = (),
) -> Path:
    """Write ``run_dir/ckpt-<step>/`` and point ``run_dir/latest`` at it.

    Args:
        run_dir: the training run's folder.
        stage: ``"autoencoder"``, ``"latent"`` or ``"segmenter"``.
        step: optimisation steps done.
        config: the resolved model config.
        weights: state dicts by part (``"model"``, ``"ema"``, ``"autoencoder"``, ``"discriminator"``).
        optimizers: ``optimizer.state_dict()`` by name (e.g. ``"optimizer"``, ``"disc_optimizer"``).
        training_state: JSON-serialisable state for an exact resume (RNG, data position...).
        latent_scale_factor: the latent stage's scale factor.
        metrics: JSON-serialisable summary metrics.
        data_card: ``{"path": ..., "sha256": ...}`` of the training data's card.
        writers: ``writer(folder, info)`` callbacks adding files before the folder is published.

    Returns:
        The checkpoint folder.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if (stage == "segmenter") != isinstance(config, SegmenterConfig):
        raise ValueError(
            f"a {stage} checkpoint needs a {'SegmenterConfig' if stage == 'segmenter' else 'ModelConfig'}"
        )
    unknown = sorted(set(weights) - set(PARTS))
    if unknown or "model" not in weights:
        raise ValueError(f"weights parts must include 'model' and be among {PARTS}; got {sorted(weights)}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = run / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = weights_metadata(stage, step)
        flat = {
            f"{part}.{key}": t.detach().cpu().contiguous().clone()
            for part, sd in weights.items()
            for key, t in sd.items()
        }
        _save_safetensors(tmp / WEIGHTS_FILE, flat, meta)
        opt_tensors: dict[str, Tensor] = {}
        opt_meta: dict[str, Any] = {}
        for opt_name, sd in (optimizers or {}).items():
            t, m = flatten_optimizer_state(sd, opt_name)
            opt_tensors.update(t)
            opt_meta[opt_name] = m
        _save_safetensors(tmp / OPTIMIZER_FILE, opt_tensors, meta)
        info: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "medidiff_version": medidiff.__version__,
            "created": datetime.now(UTC).isoformat(),
            "stage": stage,
            "step": int(step),
            "config": config.model_dump(mode="json"),
            "files": {f: sha256_file(tmp / f) for f in (WEIGHTS_FILE, OPTIMIZER_FILE)},
            "parts": sorted(weights),
            "optimizers": opt_meta,
            "latent_scale_factor": latent_scale_factor,
            "data_card": dict(data_card) if data_card is not None else None,
            "metrics": _finite(dict(metrics or {})),
            "training_state": dict(training_state or {}),
        }
        atomic_write_text(tmp / INFO_FILE, _json_text(info))
        for writer in writers:
            writer(tmp, info)
        _fsync_dir(tmp)
        final = run / name
        old = run / f".{name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():  # a rerun reached the same step again: replace the earlier folder
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(run / LATEST_FILE, name + "\n")
        _fsync_dir(run)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- loading
def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder ``run_dir/latest`` names, or ``None`` if the run has no checkpoint yet.

    Raises:
        CheckpointError: ``latest`` names a folder that does not exist.
    """
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    target = Path(run_dir) / name
    if not name or "/" in name or not target.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder in {run_dir}")
    return target


def _refuse(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a medidiff checkpoint: {what}. A medidiff checkpoint is a folder ckpt-<step>/ "
        f"written by medidiff training (holding {INFO_FILE} and {WEIGHTS_FILE}), or a training run "
        f"folder with a '{LATEST_FILE}' file."
    )


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The medidiff tag of a safetensors file (``{}`` if it has none), or ``None`` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:
        return None
    try:
        tag = json.loads(meta.get(_META_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return tag if isinstance(tag, dict) else {}


def _resolve_folder(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name in (INFO_FILE, WEIGHTS_FILE, OPTIMIZER_FILE) and (path.parent / INFO_FILE).is_file():
            return path.parent
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise _refuse(
                path,
                "it looks like a pickled PyTorch file, which medidiff never loads (unpickling can run code)",
            )
        if path.suffix == ".safetensors":
            meta = _safetensors_metadata(path)
            if meta is None:
                raise _refuse(path, "it is not a readable safetensors file")
            if meta.get("format") != FORMAT:
                raise _refuse(path, "it is a safetensors file without medidiff checkpoint metadata")
            raise _refuse(path, f"its {INFO_FILE} is missing beside it")
        raise _refuse(path, "it is a file, not a checkpoint folder")
    if (path / INFO_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise _refuse(path, f"the folder holds neither {INFO_FILE} nor a '{LATEST_FILE}' file")


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder; tensors are read on demand.

    Attributes:
        path: the ``ckpt-<step>`` folder.
        info: the parsed ``checkpoint.json``.
        config: the model config the checkpoint was trained with.
    """

    path: Path
    info: dict[str, Any]
    config: ModelConfig

    @property
    def stage(self) -> str:
        return str(self.info["stage"])

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def latent_scale_factor(self) -> float | None:
        v = self.info.get("latent_scale_factor")
        return None if v is None else float(v)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.info.get("metrics") or {})

    @property
    def data_card(self) -> dict[str, Any] | None:
        return self.info.get("data_card")

    @property
    def training_state(self) -> dict[str, Any]:
        return dict(self.info.get("training_state") or {})

    @property
    def weights_sha256(self) -> str:
        return str(self.info["files"][WEIGHTS_FILE])

    @property
    def trained_weights_sha256(self) -> str:
        """SHA-256 of the weights file that training wrote: this one's, or a release's source's.

        A release (:mod:`medidiff.train.release`) holds its source's EMA tensors bit for bit, so a figure
        measured with either belongs to both; this is the hash to match such figures against. A release
        stored in float16 holds other tensors: its own hash.
        """
        release = self.info.get("release") or {}
        source = release.get("source_weights_sha256")
        if source and release.get("weights_dtype", "as trained") == "as trained":
            return str(source)
        return self.weights_sha256

    @property
    def inference_only(self) -> bool:
        """A release (:mod:`medidiff.train.release`): network weights only, nothing to resume from."""
        return bool(self.info.get("inference_only"))

    @property
    def parts(self) -> list[str]:
        return list(self.info.get("parts", []))

    def weights(self, part: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """State dict of one part (``"model"``, ``"ema"``, ``"autoencoder"``, ``"discriminator"``)."""
        if part not in self.parts:
            raise KeyError(f"checkpoint {self.path} has no {part!r} weights; it has {self.parts}")
        from safetensors import safe_open

        prefix = part + "."
        out: dict[str, Tensor] = {}
        with safe_open(str(self.path / WEIGHTS_FILE), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
        return out

    def require_resumable(self) -> None:
        """Raise :class:`CheckpointError` for an inference-only release: it holds nothing to train on from."""
        if self.inference_only:
            source = (self.info.get("release") or {}).get("source_weights_sha256")
            raise CheckpointError(
                f"{self.path} is an inference-only release without optimizer state: it cannot be resumed "
                f"or extended. Train on from its source checkpoint (weights SHA-256 {source}), or start a "
                "new run folder."
            )

    def optimizer_state(self, name: str) -> dict[str, Any]:
        """``state_dict`` of optimizer ``name``, for ``optimizer.load_state_dict``."""
        self.require_resumable()
        metas = self.info.get("optimizers", {})
        if name not in metas:
            raise KeyError(f"checkpoint {self.path} has no optimizer {name!r}; it has {sorted(metas)}")
        from safetensors.torch import load_file

        tensors = load_file(str(self.path / OPTIMIZER_FILE))
        return unflatten_optimizer_state(tensors, metas[name], name)


def load_checkpoint(
    path: str | os.PathLike[str], *, expect_stage: str | None = None, verify: bool = True
) -> Checkpoint:
    """Open and validate a medidiff checkpoint.

    Args:
        path: a ``ckpt-<step>`` folder, a file inside one, or a run folder (its ``latest`` is used).
        expect_stage: refuse checkpoints of another stage (``"autoencoder"`` or ``"latent"``).
        verify: check the tensor files against the SHA-256 recorded at save time.

    Raises:
        CheckpointError: not a medidiff checkpoint (a foreign or pickled file, a folder without
            ``checkpoint.json``), a newer format, a corrupt or modified file, or the wrong stage.
    """
    folder = _resolve_folder(Path(path))
    info_path = folder / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{info_path} is corrupt (not valid JSON: {e}); use an earlier checkpoint"
        ) from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _refuse(folder, f"{INFO_FILE} does not carry the format tag {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format version {version!r}; this medidiff reads up to "
            f"{FORMAT_VERSION}: upgrade medidiff"
        )
    missing = [k for k in ("stage", "step", "config", "files", "parts") if k not in info]
    if missing:
        raise CheckpointError(f"{info_path} lacks the fields {missing}; the checkpoint is incomplete")
    # an inference-only release (medidiff.train.release) carries no optimizer state
    required = (WEIGHTS_FILE,) if info.get("inference_only") else (WEIGHTS_FILE, OPTIMIZER_FILE)
    for fname in required:
        fpath = folder / fname
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {fname} is missing")
        if verify and sha256_file(fpath) != info["files"].get(fname):
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {fname} does not match the SHA-256 recorded when it "
                "was saved (truncated or modified); use an earlier checkpoint"
            )
    meta = _safetensors_metadata(folder / WEIGHTS_FILE)
    if meta is None or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {WEIGHTS_FILE} is not a medidiff weights file"
        )
    what = {
        "autoencoder": "an autoencoder",
        "latent": "a latent diffusion model",
        "segmenter": "a segmentation model",
    }
    if expect_stage is not None and info["stage"] != expect_stage:
        raise CheckpointError(
            f"{folder} is {what.get(info['stage'], repr(info['stage']))} checkpoint, but "
            f"{what.get(expect_stage, expect_stage)} checkpoint is needed here"
        )
    try:
        config_type = SegmenterConfig if info["stage"] == "segmenter" else ModelConfig
        config = config_type.model_validate(info["config"])
    except ValidationError as e:
        raise CheckpointError(f"checkpoint {folder} holds a config this medidiff cannot read: {e}") from e
    return Checkpoint(path=folder, info=info, config=config)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- for inference
@dataclass
class TrainedModels:
    """Networks restored from a checkpoint, in eval mode.

    Attributes:
        config: the model config.
        autoencoder: MONAI ``AutoencoderKL``.
        unet: :class:`~medidiff.models.build.ConditionalUNet` (latent checkpoints only).
        scheduler: MONAI ``DDPMScheduler`` it was trained with (latent checkpoints only).
        latent_scale_factor: multiply encoder latents by this before diffusion (divide before decoding).
        checkpoint: where they came from.
    """

    config: ModelConfig
    autoencoder: nn.Module
    unet: nn.Module | None
    scheduler: Any | None
    latent_scale_factor: float | None
    checkpoint: Checkpoint

    def denoiser(self) -> nn.Module:
        """The latent network as a VE denoiser ``D(x, sigma, modality=..., spacing=...)``."""
        if self.unet is None or self.scheduler is None:
            raise CheckpointError(f"{self.checkpoint.path} holds an autoencoder only; it has no denoiser")
        from medidiff.diffusion.precond import from_monai_scheduler

        return from_monai_scheduler(self.unet, self.scheduler)


def load_models(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    expect_stage: str | None = None,
) -> TrainedModels:
    """Build the networks of a checkpoint and load their weights (EMA weights by default).

    Raises:
        CheckpointError: see :func:`load_checkpoint`.
    """
    from medidiff.models.build import build_autoencoder, build_scheduler, build_unet

    ckpt = load_checkpoint(path, expect_stage=expect_stage)
    cfg = ckpt.config
    trained = "ema" if use_ema and "ema" in ckpt.parts else "model"
    ae = build_autoencoder(cfg.autoencoder)
    unet = scheduler = None
    if ckpt.stage == "autoencoder":
        ae.load_state_dict(ckpt.weights(trained))
    else:
        ae.load_state_dict(ckpt.weights("autoencoder"))
        unet = build_unet(cfg.unet)
        unet.load_state_dict(ckpt.weights(trained))
        unet.to(device).eval()
        scheduler = build_scheduler(cfg.scheduler)
    ae.to(device).eval()
    return TrainedModels(
        config=cfg,
        autoencoder=ae,
        unet=unet,
        scheduler=scheduler,
        latent_scale_factor=ckpt.latent_scale_factor,
        checkpoint=ckpt,
    )
