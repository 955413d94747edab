"""Command-line interface: thin wrappers over the stage functions (``medidiff --help``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medidiff import __version__

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.stages.ingest import IngestResult

app = typer.Typer(
    name="medidiff",
    help="3D latent diffusion for medical imaging: ingest, synthesis, reconstruction — with provenance.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    # A traceback with local variables would print header values (patient names) on stderr.
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

_PHASES = {
    "scan": "Reading headers",
    "convert": "Converting series",
    "sample": "Sampling (steps)",
    "write": "Volumes written",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medidiff {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


class _RichProgress:
    """Adapter from the stage's ``progress(phase, done, total)`` callback to a rich progress bar.

    With ``lazy``, the bar (and its refresh thread) starts at the first call: the ingest stage
    forks its worker processes before that, and a fork with other threads running is unsafe.
    """

    def __init__(self, progress: Progress, *, lazy: bool = False) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.lazy = lazy
        self.started = not lazy

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(_PHASES.get(phase, phase), total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def _sampling_progress(steps: int, particles: int) -> Iterator[Callable[[int, int, float], None]]:
    """A progress bar over a sampler's steps showing the effective sample size; the stage's errors as
    exit codes (:func:`_stage_errors`). Yields the stage's ``progress`` callback."""
    with _progress_bar() as bar, _stage_errors():
        task = bar.add_task("Sampling (ESS -)", total=steps)

        def cb(step: int, total: int, ess: float) -> None:
            bar.update(task, completed=step, total=total, description=f"Sampling (ESS {ess:.1f}/{particles})")

        yield cb


@contextlib.contextmanager
def _stage_errors() -> Iterator[None]:
    """A stage's refusals as exit code 2 (a bad request or input), a numerical failure as exit code 1."""
    from medidiff.train.checkpoint import CheckpointError

    try:
        yield
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    except FloatingPointError as e:
        console.print(f"[red]failed:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e


# options the sampling commands (synthesize, reconstruct, denoise, segment) share
_PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
_KernelName = Literal["reference", "compiled", "triton"]  # medidiff.inverse.kernels.KERNELS (a test checks)
_Precision = Annotated[
    _PrecisionName,
    typer.Option(
        help="Network precision: auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16 (CUDA only). bf16 on a "
        "device without it runs in fp32, with a warning; requested and used are recorded."
    ),
]
_KERNELS_HOW = (
    "reference (eager PyTorch), compiled (torch.compile) or triton (CUDA; elsewhere compiled, with a warning). "
    "Requested and used are recorded"
)
_ChunkSize = Annotated[
    int | None, typer.Option(help="Particles per network call (bounds memory; same result).")
]


def _parse_grid(grid: str | None) -> tuple[int, int, int] | None:
    """``--grid I,J,K`` as three positive integers (exit code 2 with a message otherwise)."""
    if grid is None:
        return None
    try:
        values = tuple(int(v) for v in grid.split(","))
        if len(values) != 3 or min(values) < 1:
            raise ValueError
    except ValueError:
        console.print(f"[red]error:[/red] --grid must be three positive integers I,J,K; got {grid!r}.")
        raise typer.Exit(2) from None
    return values  # type: ignore[return-value]


def _say(message: str) -> None:
    """A stage's ``notify``: the plan as it is, warnings in yellow."""
    if message.startswith("warning: "):
        console.print(f"[yellow]warning:[/yellow] {escape(message.removeprefix('warning: '))}")
    else:
        console.print(escape(message))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff ingest /data/dicom_export /data/ingested\n\n"
        "  medidiff ingest ./demo_drop ./demo_ingested --config configs/ingest.yaml\n\n"
        "Writes DST/<subject>/<series>.nii.gz with a JSON sidecar and a provenance record per "
        "series, DST/manifest.json (every input and output with SHA-256, every problem), "
        "DST/datacard.json/.md and DST/provenance.prov.json. Output names are built from keyed "
        "hashes and acquisition attributes, never from input names. Exit code 0 when at least one "
        "series was converted, 1 when none could be, 2 on a usage error, 3 when another run held "
        "DST past --lock-timeout."
    )
)
def ingest(
    src: Annotated[Path, typer.Argument(help="Folder (or file) of DICOM and/or NIfTI inputs; read only.")],
    dst: Annotated[Path, typer.Argument(help="Output folder (created if missing).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (see configs/ingest.yaml).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (header pass and conversion); default: all cores.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name for the data card.")] = None,
    source: Annotated[str | None, typer.Option(help="Where the data came from (data card).")] = None,
    licence: Annotated[str, typer.Option(help="Terms of use of the data (data card).")] = "not stated",
    lock_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait while another run writes into DST (default: wait until it ends)."),
    ] = None,
) -> None:
    """Convert a DICOM/NIfTI drop into canonical NIfTI volumes with manifest, data card and provenance."""
    import warnings

    from medidiff.config import ConfigError, IngestConfig, load_config
    from medidiff.io.lock import DestinationBusy
    from medidiff.stages.ingest import check_ingest_args
    from medidiff.stages.ingest import ingest as run_ingest

    # Third-party warnings and log lines can quote header values: the manifest says it all.
    warnings.simplefilter("ignore")
    for noisy in ("pydicom", "nibabel"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        cfg = load_config(config, IngestConfig, {"workers": workers} if workers else None)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if str(src).startswith("pacs:"):
        _ingest_from_pacs(str(src), dst, cfg, name=name, source=source, licence=licence)
        return
    if not src.exists():
        console.print(f"[red]error:[/red] input {src} does not exist")
        raise typer.Exit(2)
    if lock_timeout is not None and lock_timeout < 0:
        console.print("[red]error:[/red] --lock-timeout must be 0 or more seconds")
        raise typer.Exit(2)
    try:  # usage errors, before anything is written
        check_ingest_args(src, dst, cfg)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    bar = _progress_bar()
    try:
        result = run_ingest(
            src,
            dst,
            cfg,
            progress=_RichProgress(bar, lazy=True),
            name=name,
            source=source,
            licence=licence,
            lock_timeout=lock_timeout,
            on_wait=lambda msg: console.print(f"[yellow]{msg}[/yellow]"),
        )
    except DestinationBusy as e:
        bar.stop()
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(3) from e
    except Exception as e:  # a bug: say so without the message, which may quote input text
        bar.stop()
        console.print(
            f"[red]internal error[/red] ({type(e).__name__}); nothing already written was lost. Please "
            "report it; run with MEDIDIFF_DEBUG=1 to see the traceback (it may show patient data)"
        )
        if os.environ.get("MEDIDIFF_DEBUG"):
            raise
        raise typer.Exit(1) from None
    bar.stop()
    _print_ingest_summary(result)
    if result.n_converted == 0:
        console.print("[red]nothing could be converted[/red]; see the problems above and the manifest")
        raise typer.Exit(1)


def _ingest_from_pacs(
    url: str, dst: Path, cfg: Any, *, name: str | None, source: str | None, licence: str
) -> None:
    """``pacs://PROFILE/STUDYUID``: C-GET the study into a temporary folder beside DST, ingest it, remove it."""
    import re
    import tempfile

    from medidiff.export.pacs import PacsError, load_profile, pull_study
    from medidiff.stages.ingest import ingest as run_ingest

    m = re.fullmatch(r"pacs:/+([A-Za-z0-9_.-]+)/([0-9.]+)/?", url)
    if m is None:
        console.print("[red]error:[/red] a PACS source is pacs://PROFILE/STUDYINSTANCEUID (digits and dots).")
        raise typer.Exit(2)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        profile = load_profile(m.group(1), os.environ.get("MEDIDIFF_PACS_CONFIG"))
        with tempfile.TemporaryDirectory(prefix=".medidiff-pacs-", dir=dst.parent) as tmp:
            files = pull_study(profile, m.group(2), tmp)
            console.print(f"Pulled {len(files)} instances from {escape(profile.name)} (C-GET).")
            result = run_ingest(
                Path(tmp),
                dst,
                cfg,
                name=name,
                source=source or f"PACS profile {profile.name}",
                licence=licence,
            )
    except PacsError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    _print_ingest_summary(result)
    if result.n_converted == 0:
        console.print("[red]nothing could be converted[/red]; see the problems above and the manifest")
        raise typer.Exit(1)


def _print_ingest_summary(result: IngestResult) -> None:
    table = Table(title="Series converted", show_lines=False)
    for col in ("subject", "modality", "kind", "shape", "spacing (mm)", "output"):
        table.add_column(col)
    for o in result.outputs:
        table.add_row(
            o["subject"],
            o["modality"],
            o["kind"],
            "x".join(str(s) for s in o["shape"]),
            "x".join(f"{s:.3g}" for s in o["spacing_mm"]),
            o["path"],
        )
    console.print(table)
    if result.problems:
        pt = Table(title="Problems", show_lines=False)
        for col in ("severity", "kind", "where", "message"):
            pt.add_column(col, overflow="fold")
        colour = {"error": "red", "warning": "yellow", "skipped": "dim"}
        for p in result.problems:
            where = (
                p.paths[0] if len(p.paths) == 1 else f"{len(p.paths)} files" if p.paths else (p.series or "")
            )
            c = colour.get(str(p.severity), "")
            pt.add_row(f"[{c}]{p.severity}[/{c}]", str(p.kind), where, p.message)
        console.print(pt)
    console.print(
        f"[bold]{result.n_converted}[/bold] series converted, [bold]{result.n_failed}[/bold] failed, "
        f"{len(result.problems)} problem(s). Manifest: {result.manifest}  Data card: {result.datacard}"
    )


@app.command("demo-data", epilog="Example:\n\n  medidiff demo-data ./demo_drop --seed 0")
def demo_data(
    dst: Annotated[Path, typer.Argument(help="Folder to write the synthetic DICOM drop into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    n_mr: Annotated[int, typer.Option(help="Number of brain MR subjects (from the MNI152 template).")] = 20,
    n_ct: Annotated[int, typer.Option(help="Number of CT phantoms.")] = 10,
) -> None:
    """Write the built-in synthetic demo cohort as a real DICOM drop (with deliberately broken files)."""
    from medidiff.demo.cohort import make_demo_cohort

    with _progress_bar() as bar:
        task = bar.add_task("Writing demo cohort", total=n_mr + n_ct)

        def cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = make_demo_cohort(dst, seed=seed, n_mr=n_mr, n_ct=n_ct, progress=cb)
    console.print(f"Demo cohort written to [bold]{dst}[/bold]: {result}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff train configs/model_demo.yaml configs/data_demo.yaml runs/demo\n\n"
        "  medidiff train configs/model_demo.yaml configs/data_demo.yaml runs/demo --stage latent\n\n"
        "Run it again on the same folder to resume from the latest checkpoint. To train a finished run\n"
        "on (a warm restart of the learning-rate schedule):\n\n"
        "  medidiff train configs/model_pixel_demo.yaml configs/data_demo.yaml runs/pixel --stage latent"
        " --extend-to 8000"
    )
)
def train(
    model_config: Annotated[Path, typer.Argument(help="Model YAML (networks, schedule, training).")],
    data_config: Annotated[
        Path, typer.Argument(help="Data YAML (manifest, spacing, patches, normalisation).")
    ],
    out: Annotated[Path, typer.Argument(help="Run folder; resumed if it holds checkpoints.")],
    stage: Annotated[str, typer.Option(help="autoencoder, latent or both.")] = "both",
    until_step: Annotated[int | None, typer.Option(help="Stop each stage after this step.")] = None,
    extend_to: Annotated[
        int | None,
        typer.Option(help="Train an existing run of --stage on to this many steps in total."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA if present).")
    ] = None,
) -> None:
    """Train the 3D autoencoder and the latent diffusion model (or a pixel-space model) on an ingest manifest."""
    from medidiff.config import ConfigError
    from medidiff.stages.train import train_stage

    if stage not in ("autoencoder", "latent", "both"):
        console.print(f"[red]error:[/red] --stage must be autoencoder, latent or both, not {stage!r}")
        raise typer.Exit(2)
    try:
        result = train_stage(
            model_config,
            data_config,
            out,
            stage=stage,  # type: ignore[arg-type]
            until_step=until_step,
            extend_to=extend_to,
            device=device,
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    table = Table(title="Training")
    for col in ("stage", "step", "last loss", "skipped", "checkpoint"):
        table.add_column(col)
    for name, r in result.items():
        last = next((f"{x:.4g}" for x in reversed(r.losses) if x == x), "-")
        table.add_row(name, str(r.step), last, str(r.skipped), str(r.checkpoint))
    console.print(table)


@app.command(
    epilog=(
        "Example:\n\n"
        "  medidiff release runs/pixel/latent medidiff/checkpoints/demo-pixel "
        "--evaluation bench_out/imaging/reporting.json --rebuild 'make prior'\n\n"
        "Writes DEST/<stage>/ckpt-<step>/ with the EMA weights only (bit for bit), a model card with "
        "their SHA-256, and the data.json that inference reads; absolute paths are cut to file names."
    )
)
def release(
    source: Annotated[Path, typer.Argument(help="Checkpoint ckpt-<step> or a training run's stage folder.")],
    dest: Annotated[Path, typer.Argument(help="New folder for the release.")],
    evaluation: Annotated[
        Path | None, typer.Option(help="JSON object of held-out figures to put in the model card.")
    ] = None,
    rebuild: Annotated[str | None, typer.Option(help="The command that rebuilds the source.")] = None,
    final_reason: Annotated[
        str | None,
        typer.Option(
            help="Release a checkpoint that stopped before its planned steps as final, and say why "
            "(recorded; downstream stages then do not warn that it is intermediate)."
        ),
    ] = None,
    half: Annotated[
        bool,
        typer.Option(
            help="Store the weights in float16 (half the size; loading casts them back to float32)."
        ),
    ] = False,
    sampling: Annotated[
        str | None,
        typer.Option(
            help='Segmenters: JSON of inference defaults for the release, e.g. \'{"sample_eta": 1, "fuse": '
            "\"steps\"}' (samples, sample_steps, sample_eta, fuse; recorded with the source's values)."
        ),
    ] = None,
) -> None:
    """Cut an inference-only release of a checkpoint (no optimizer state, no local paths) for shipping."""
    import json

    from medidiff.train.checkpoint import CheckpointError, load_checkpoint
    from medidiff.train.release import release_checkpoint
    from medidiff.train.seg_release import release_segmenter

    try:
        figures = json.loads(evaluation.read_text(encoding="utf-8")) if evaluation is not None else None
        if figures is not None and not isinstance(figures, dict):
            raise ValueError(f"{evaluation} must hold a JSON object of figures")
        if load_checkpoint(source, verify=False).stage == "segmenter":
            if final_reason is not None:
                raise ValueError("--final-reason is for diffusion models; a segmenter stops at its budget")
            knobs = json.loads(sampling) if sampling is not None else None
            if knobs is not None and not isinstance(knobs, dict):
                raise ValueError('--sampling must be a JSON object, e.g. \'{"fuse": "steps"}\'')
            folder = release_segmenter(
                source, dest, evaluation=figures, rebuild=rebuild, half=half, sampling=knobs
            )
        else:
            if sampling is not None:
                raise ValueError("--sampling is for segmenters only")
            folder = release_checkpoint(
                source, dest, evaluation=figures, rebuild=rebuild, final_reason=final_reason, half=half
            )
    except (
        CheckpointError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
    ) as e:  # JSONDecodeError is a ValueError
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"Released [bold]{folder}[/bold] (model card: {folder / 'model_card.md'})")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff synthesize runs/demo --n 8 --steps 20 --out synth/\n\n"
        "  medidiff synthesize --n 2 --modality MR --out synth/   (the shipped demo prior)\n\n"
        "  medidiff synthesize runs/demo/latent/ckpt-00002000 --n 4 --steps 25 --sampler heun "
        "--seed 7 --modality MR --out synth_mr/\n\n"
        "  medidiff synthesize runs/demo --n 1 --steps 20 --shape 128 128 96 --decode-tile 16 --out big/\n\n"
        "Writes OUT/synth-<seed>-<i>.nii.gz (RAS, the training spacing) with a JSON sidecar marking it "
        "synthetic and a provenance record (checkpoint SHA-256, sampler, steps, seed), plus "
        "OUT/synthesis.json (seconds per volume, peak memory). Sample i uses seed+i, whatever the "
        "batch size. Exit code 0 on success, 1 when sampling failed (non-finite values), 2 on a "
        "usage error (unknown sampler, not a latent diffusion checkpoint, bad shape)."
    )
)
def synthesize(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")],
    ckpt: Annotated[
        Path | None,
        typer.Argument(
            help="Latent checkpoint ckpt-<step>, its stage folder, or a `medidiff train` run "
            "(default: the shipped demo prior, with a warning)."
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Number of volumes.", min=1)] = 1,
    steps: Annotated[int, typer.Option(help="Sampler steps.", min=1)] = 20,
    sampler: Annotated[
        str, typer.Option(help="dpmpp_2m, heun, euler, ddim or euler_ancestral.")
    ] = "dpmpp_2m",
    seed: Annotated[int, typer.Option(help="Sample i uses seed + i.", min=0)] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples drawn together (memory vs speed).", min=1)] = 1,
    modality: Annotated[
        str | None, typer.Option(help="Modality to condition on (default: the training data's first).")
    ] = None,
    shape: Annotated[
        tuple[int, int, int] | None,
        typer.Option(help="Volume size in voxels (default: the training patch); 2D models: H W 1."),
    ] = None,
    precision: _Precision = "auto",
    kernels: Annotated[
        _KernelName,
        typer.Option(
            help=f"The sampler step's arithmetic (only dpmpp_2m has a fused step; the others ignore it): "
            f"{_KERNELS_HOW} (synthesis.json and the provenance: config.compute)."
        ),
    ] = "reference",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA if present).")
    ] = None,
    decode_tile: Annotated[
        int | None,
        typer.Option(help="Decode in tiles of this many latent voxels per side (default: only if needed)."),
    ] = None,
    graph: Annotated[
        str, typer.Option(help="jit: frozen TorchScript UNet (faster, same result); eager: the module as is.")
    ] = "jit",
) -> None:
    """Synthesize volumes from a latent diffusion checkpoint, marked synthetic, with provenance."""
    from medidiff.diffusion.samplers import SAMPLERS
    from medidiff.stages.synthesize import NonFiniteSampleError
    from medidiff.stages.synthesize import synthesize as run_synthesize

    if sampler not in SAMPLERS:
        console.print(
            f"[red]error:[/red] unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}"
        )
        raise typer.Exit(2)
    if ckpt is not None and not ckpt.exists():
        console.print(f"[red]error:[/red] checkpoint {ckpt} does not exist")
        raise typer.Exit(2)
    with _progress_bar() as bar:
        try:
            result = run_synthesize(
                ckpt,
                out,
                n=n,
                steps=steps,
                sampler=sampler,
                seed=seed,
                batch_size=batch_size,
                modality=modality,
                shape=shape,
                precision=precision,
                device=device,
                decode_tile=decode_tile,
                graph=graph,
                kernels=kernels,
                progress=_RichProgress(bar),
            )
        except NonFiniteSampleError as e:
            console.print(f"[red]sampling failed:[/red] {e}")
            raise typer.Exit(1) from e
        except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
    table = Table(title="Synthetic volumes (not real patients)")
    for col in ("output", "seed", "shape", "spacing (mm)", "modality", "units"):
        table.add_column(col, overflow="fold")
    for path, s in zip(result.outputs, result.seeds, strict=True):
        table.add_row(
            str(path),
            str(s),
            "x".join(str(v) for v in result.shape),
            "x".join(f"{v:.3g}" for v in result.spacing_mm),
            result.modality,
            result.units,
        )
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    tiled = (
        f", decoded in tiles of {'x'.join(map(str, result.decode_tile))} latent voxels"
        if result.decode_tile
        else ""
    )
    console.print(
        f"[bold]{len(result.outputs)}[/bold] volume(s), {result.sampler} x {result.steps} steps "
        f"({result.nfe} network evaluations per batch), {result.precision}, {result.kernels} kernels on "
        f"{result.device}{tiled}: "
        f"{result.seconds_per_volume:.2f} s per volume, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB "
        f"({result.peak_memory_kind}). Run record: {result.run_json}"
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff reconstruct --prior runs/demo --reference ingested/sub-x/0001_t1.nii.gz "
        "--simulate mri --accel 4 --out recon/\n\n"
        "  medidiff reconstruct --prior runs/demo --reference ct.nii.gz --simulate ct --views 60 --out recon/\n\n"
        "  medidiff reconstruct --prior runs/demo --measurement kspace.npy --mask mask.npy --modality MR --out recon/\n\n"
        "  medidiff reconstruct --method tv --reference ct.nii.gz --simulate ct --views 30 --out recon_tv/\n\n"
        "Writes mean.nii.gz, std.nii.gz (per-voxel posterior standard deviation), reconstruction.json "
        "(ESS trace, data-consistency chi^2, PSNR/SSIM and 90% interval coverage when a reference "
        "exists) and provenance records."
    )
)
def reconstruct(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    prior: Annotated[
        Path | None,
        typer.Option(
            help="Diffusion checkpoint (latent or pixel-space) or its training run folder "
            "(default: the shipped demo prior, with a warning)."
        ),
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Reference NIfTI (ground truth / to simulate from).")
    ] = None,
    simulate: Annotated[str | None, typer.Option(help="Simulate the measurement: mri or ct.")] = None,
    measurement: Annotated[Path | None, typer.Option(help="Raw k-space or sinogram (.npy/.npz/.h5).")] = None,
    mask: Annotated[Path | None, typer.Option(help="Sampling mask for raw k-space.")] = None,
    angles: Annotated[
        Path | None, typer.Option(help="Projection angles (radians) for a raw sinogram.")
    ] = None,
    method: Annotated[str, typer.Option(help="smc, afdps, dps, zero_filled, fbp or tv.")] = "smc",
    modality: Annotated[
        str | None, typer.Option(help="CT or MR (default: from the reference/prior).")
    ] = None,
    accel: Annotated[float, typer.Option(help="MRI acceleration for --simulate mri.")] = 4.0,
    mask_kind: Annotated[str, typer.Option(help="equispaced, random or poisson.")] = "equispaced",
    views: Annotated[int, typer.Option(help="CT views for --simulate ct.")] = 60,
    sigma_y: Annotated[float, typer.Option(help="Measurement noise standard deviation.")] = 0.01,
    particles: Annotated[int, typer.Option(help="Number of SMC particles.")] = 16,
    steps: Annotated[int, typer.Option(help="Sampler steps (noise levels).")] = 50,
    sigma_max: Annotated[
        float | None,
        typer.Option(help="Pixel-space priors: start sampling at this noise level (normalised image units)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    keep_samples: Annotated[bool, typer.Option(help="Also write the posterior samples (4D NIfTI).")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    grid: Annotated[
        str | None,
        typer.Option(
            help="I,J,K: reconstruct this centred block instead of the whole volume (multiples of the "
            "prior's downsampling)."
        ),
    ] = None,
    crop: Annotated[
        bool, typer.Option(help="Reconstruct only the prior's training patch at the volume's centre.")
    ] = False,
    tiling: Annotated[
        str,
        typer.Option(
            help="auto (default): whole when the grid is at most 1.5x the prior's training patch along "
            "every axis, else patches; patches: the prior on overlapping patches of its training size, seams "
            "blended; whole: on the whole grid at once (its attention then spans the whole volume)."
        ),
    ] = "auto",
    tile_overlap: Annotated[
        float, typer.Option(help="Overlap fraction of the patches (--tiling patches).")
    ] = 0.25,
    precision: _Precision = "auto",
    chunk_size: _ChunkSize = None,
    kernels: Annotated[
        _KernelName,
        typer.Option(
            help=f"smc's particle arithmetic (--method smc): {_KERNELS_HOW} (the one that ran: "
            "reconstruction.json, sampler_info.kernels)."
        ),
    ] = "reference",
) -> None:
    """Reconstruct a scan from undersampled MRI or sparse-view CT with a diffusion prior (ensemble SMC)."""
    from medidiff.stages.reconstruct import reconstruct_volume

    grid_t = _parse_grid(grid)
    # the stage resolves the fallbacks (triton off CUDA, bf16 where unsupported), warns through notify
    # before any compute and records what was asked for and what ran
    if method != "smc" and kernels != "reference":
        _say(f"warning: --kernels {kernels} applies to method 'smc' only; {method} runs as it is")

    with _sampling_progress(steps, particles) as cb:
        result = reconstruct_volume(
            out,
            prior=prior,
            reference=reference,
            simulate=simulate,  # type: ignore[arg-type]
            measurement=measurement,
            mask=mask,
            angles=angles,
            method=method,
            modality=modality,
            acceleration=accel,
            mask_kind=mask_kind,
            views=views,
            sigma_y=sigma_y,
            n_particles=particles,
            steps=steps,
            sigma_max=sigma_max,
            seed=seed,
            keep_samples=keep_samples,
            device=device,
            grid=grid_t,  # type: ignore[arg-type]
            crop=crop,
            tiling=tiling,
            tile_overlap=tile_overlap,
            precision=precision,
            chunk_size=chunk_size,
            kernels=kernels,
            progress=cb,
            notify=_say,
        )
    table = Table(title="Reconstruction")
    table.add_column("metric")
    table.add_column("value")
    for k, v in result.metrics.items():
        if isinstance(v, (int, float, str)):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(f"Outputs in [bold]{result.out_dir}[/bold]")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff denoise noisy_t1.nii.gz --noise rician --out denoised/\n\n"
        "  medidiff denoise noisy.nii.gz --noise gaussian --sigma 12.5 --checkpoint runs/brain/latent "
        "--reference clean.nii.gz --out denoised/\n\n"
        "Writes mean.nii.gz, std.nii.gz, lower90.nii.gz / upper90.nii.gz (the 90% interval), denoise.json "
        "(the noise level used and how it was found; PSNR/SSIM and 90% coverage with --reference) and "
        "provenance records, all on the input's grid and affine."
    )
)
def denoise(
    image: Annotated[Path, typer.Argument(help="The noisy NIfTI volume.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    noise: Annotated[
        str,
        typer.Option(
            help="Noise model: gaussian, rician (magnitude MR), or ct (low-dose CT: the input is the full-dose "
            "truth, its scan at --dose is simulated with Poisson counts and denoised)."
        ),
    ] = "gaussian",
    sigma: Annotated[
        float | None,
        typer.Option(
            help="Noise standard deviation in the image's units (default: estimated, recorded); --noise ct: "
            "the low-dose image's noise in HU (default: estimated from the counts)."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Diffusion checkpoint or its run folder (default: the shipped demo prior, with a warning)."
        ),
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Clean volume on the same grid: PSNR, SSIM and coverage are recorded.")
    ] = None,
    modality: Annotated[str, typer.Option(help="DICOM modality code of the image.")] = "MR",
    method: Annotated[
        str,
        typer.Option(
            help="auto (ancestral sampling from the noisy image, or from the low-dose FBP for --noise ct, "
            "with a pixel-space prior; smc for a latent one), ancestral, smc, afdps or dps (smc and dps sample "
            "CT under the projection-domain Poisson likelihood)."
        ),
    ] = "auto",
    particles: Annotated[
        int,
        typer.Option(
            help="Posterior samples (particles). The default 8 x 40 steps is what the benchmarks measured and "
            "the shipped priors' 90% intervals are calibrated at."
        ),
    ] = 8,  # medidiff.stages.denoise.DEFAULT_PARTICLES (tests/test_cli: they agree)
    steps: Annotated[int, typer.Option(help="Sampler steps (noise levels).")] = 40,  # DEFAULT_STEPS
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    tiling: Annotated[
        str, typer.Option(help="patches (default) or whole; see `reconstruct --help`.")
    ] = "patches",
    grid: Annotated[
        str | None,
        typer.Option(
            help="I,J,K: denoise only this centred block (voxels along the file's axes), a quick look."
        ),
    ] = None,
    precision: _Precision = "auto",
    kernels: Annotated[
        _KernelName,
        typer.Option(
            help=f"smc's particle arithmetic (ancestral sampling, afdps and dps have none: recorded only): "
            f"{_KERNELS_HOW} (denoise.json and the provenance: compute)."
        ),
    ] = "reference",
    chunk_size: _ChunkSize = None,
    dose: Annotated[
        float | None, typer.Option(help="--noise ct: dose fraction of the full dose, e.g. 0.25 (default).")
    ] = None,
    photons: Annotated[
        float | None, typer.Option(help="--noise ct: incident photons per ray at full dose (default 1e5).")
    ] = None,
    views: Annotated[int | None, typer.Option(help="--noise ct: view angles over 180 degrees.")] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="Widen the 90% interval by the prior's split-conformal calibration (measured on held-out "
            "volumes) when it covers this noise model and level; --no-calibrate: the particles' own interval."
        ),
    ] = True,
) -> None:
    """Denoise a volume by posterior sampling under a diffusion prior, with a per-voxel uncertainty."""
    from medidiff.stages.denoise import denoise_volume

    grid_t = _parse_grid(grid)
    with _sampling_progress(steps, particles) as cb:
        result = denoise_volume(
            image,
            out,
            noise=noise,
            sigma=sigma,
            checkpoint=checkpoint,
            reference=reference,
            modality=modality,
            method=method,
            n_particles=particles,
            steps=steps,
            seed=seed,
            device=device,
            tiling=tiling,
            grid=grid_t,
            precision=precision,
            kernels=kernels,
            chunk_size=chunk_size,
            progress=cb,
            notify=_say,
            dose=dose,
            photons=photons,
            views=views,
            calibrate=calibrate,
        )
    noise_rec = result.sidecar["noise"]
    cal = result.sidecar.get("interval90", {}).get("calibration")
    k = result.sidecar.get("interval90", {}).get("std_factor")
    if cal is not None and k is None:
        console.print("90% interval: none (the particles' effective sample size is below 2).")
    elif cal is not None:
        console.print(
            f"90% interval: mean -/+ {k:.3g} std, "
            + (
                f"calibrated (x{cal['factor']:.3g}, split conformal on held-out volumes)."
                if cal["applied"]
                else f"not calibrated ({cal['why']})."
            )
        )
    if noise_rec["model"] == "ct":
        console.print(
            f"Low-dose scan: {noise_rec['dose']:g} of {noise_rec['photons_full_dose']:g} photons per ray; the "
            f"low-dose FBP's noise is {result.sigma:.1f} HU (low_dose_fbp.nii.gz; "
            f"{'estimated from the counts' if noise_rec['estimated'] else 'given'}); "
            f"method {result.sidecar['method']['used']}."
        )
    else:
        how = "given" if not noise_rec["estimated"] else f"estimated ({noise_rec['method']})"
        console.print(f"Noise: {noise_rec['model']}, sigma {result.sigma:.4g} in the image's units, {how}.")
    if result.metrics:
        units = "HU window" if noise_rec["model"] == "ct" else "normalised units"
        table = Table(title=f"Denoising against the reference ({units})")
        table.add_column("metric")
        table.add_column("value")
        for k, v in result.metrics.items():
            if isinstance(v, int | float):
                table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(table)
        inner = result.metrics.get("inner")
        if inner:
            console.print(
                f"Away from the block's edges ({inner['margin_voxels']} voxels in-plane, where the FBP of a cut "
                f"rings): PSNR {inner['psnr_db']:.2f} dB (low-dose FBP {inner['input_psnr_db']:.2f} dB)."
            )
    console.print(f"Outputs in [bold]{escape(str(result.out_dir))}[/bold]")


@app.command(
    "train-seg",
    epilog=(
        "Examples:\n\n"
        "  medidiff train-seg configs/seg_brain.yaml runs/seg_brain_diffusion\n\n"
        "  medidiff train-seg configs/seg_brain.yaml runs/seg_brain_dynunet --arch dynunet\n\n"
        "Both designs stop at the same wall-clock budget (--budget-s, default from the config)."
    ),
)
def train_seg(
    config: Annotated[Path, typer.Argument(help="Segmentation YAML (data pairs, label card, model).")],
    out: Annotated[Path, typer.Argument(help="New run folder (its segmenter/ must not exist).")],
    arch: Annotated[
        str | None, typer.Option(help="diffusion (conditional diffusion segmenter) or dynunet (baseline).")
    ] = None,
    budget_s: Annotated[float | None, typer.Option(help="Wall-clock training budget in seconds.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop earlier after this many steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed (default: the config's).")] = None,
) -> None:
    """Train a segmenter on image / label-map pairs (label names, codes and colours from the label card)."""
    from medidiff.config import ConfigError
    from medidiff.stages.train_seg import train_segmenter

    if arch not in (None, "diffusion", "dynunet"):
        console.print(f"[red]error:[/red] --arch must be diffusion or dynunet, not {arch!r}")
        raise typer.Exit(2)
    try:
        folder = train_segmenter(
            config, out, budget_s=budget_s, max_steps=max_steps, arch=arch, seed=seed, progress=_say
        )
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    console.print(f"Checkpoint in [bold]{escape(str(folder))}[/bold]")


@app.command(
    epilog=(
        "Example:\n\n  medidiff segment scan.nii.gz --out seg/ --samples 8\n\n"
        "Writes labels.nii.gz (the label table's integer values), probabilities.nii.gz (one channel per "
        "label), uncertainty.nii.gz (normalised predictive entropy), disagreement.nii.gz and segment.json "
        "(label names, codes, colours; volumes in mL with their spread over the samples), all on the "
        "input's grid and affine."
    )
)
def segment(
    image: Annotated[Path, typer.Argument(help="The NIfTI volume to segment.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Segmenter from `medidiff train-seg` (default: the shipped demo segmenter)."),
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Samples K (default: the checkpoint's).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps per sample (default: the checkpoint's).")
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(help="DDIM eta, 0 (deterministic steps) to 1 (ancestral) (default: the checkpoint's)."),
    ] = None,
    fuse: Annotated[
        str | None,
        typer.Option(
            help="last (a sample is its last step's prediction) or steps (the mean of its steps') "
            "(default: the checkpoint's)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    precision: Annotated[
        _PrecisionName,
        typer.Option(
            help="The segmenter's precision (it runs on the CPU): auto (= fp32 there), fp32 or bf16 (autocast); "
            "fp16 needs CUDA. Recorded in segment.json and the provenance (compute)."
        ),
    ] = "auto",
    kernels: Annotated[
        _KernelName,
        typer.Option(
            help=f"Recorded only: no kernel covers the segmenter's few DDIM steps (its time is in the network); "
            f"the same choice as the other sampling commands: {_KERNELS_HOW} (segment.json: compute)."
        ),
    ] = "reference",
) -> None:
    """Segment a volume, with per-voxel uncertainty and per-structure volumes."""
    from medidiff.stages.segment import segment_volume

    bar = _RichProgress(_progress_bar(), lazy=True)  # starts at the first network pass, after the checks
    try:
        with _stage_errors():
            result = segment_volume(
                image, out, checkpoint=checkpoint, samples=samples, steps=steps, eta=eta, fuse=fuse, seed=seed,
                precision=precision, kernels=kernels, notify=_say,
                progress=lambda done, total: bar("Segmenting", done, total),
            )  # fmt: skip
    finally:
        if bar.started:
            bar.progress.stop()
    table = Table(title="Structures (mL; mean +- SD over the samples)")
    for col in ("label", "name", "volume", "samples"):
        table.add_column(col)
    for st in result.sidecar["structures"]:
        v = st["volume_ml_samples"]
        table.add_row(
            str(st["value"]), st["name"], f"{st['volume_ml']:.1f}", f"{v['mean']:.1f} +- {v['sd']:.1f}"
        )
    console.print(table)
    console.print(f"Outputs in [bold]{escape(str(result.out_dir))}[/bold]")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medidiff export results/segmentation --source /data/dicom_drop --out exports/seg\n\n"
        "  medidiff export results/denoised --out exports/denoised   (no DICOM source: a new study)\n\n"
        "Writes one sub-folder per series under OUT (01_mean/IM0001.dcm ..., 03_labels/SEG0001.dcm) and "
        "OUT/export.json. Derived series, SEG and Parametric Maps share the source's study and frame of "
        "reference and are marked research use only."
    )
)
def export(
    result_dir: Annotated[Path, typer.Argument(help="A stage's output folder (its --out).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="dicom (DICOM objects), review (review.png/.pdf, index.html) or both."),
    ] = "dicom",
    source: Annotated[
        Path | None,
        typer.Option(help="The DICOM folder the input was ingested from (default: a new study)."),
    ] = None,
    input_root: Annotated[
        list[Path] | None, typer.Option(help="Another folder to look for the stage's input volume in.")
    ] = None,
    seg_type: Annotated[str, typer.Option(help="binary (every viewer) or labelmap.")] = "binary",
    deidentify: Annotated[
        bool,
        typer.Option(
            help="PS3.15 basic profile on every object (keyed UIDs and subject id); with --source the "
            "source series is exported too, de-identified, so references resolve."
        ),
    ] = False,
    send: Annotated[
        str | None,
        typer.Option(help="Then C-STORE everything to this PACS profile and verify it by C-FIND."),
    ] = None,
    pacs_config: Annotated[
        Path | None, typer.Option(help="PACS profiles file (default: configs/pacs.yaml).")
    ] = None,
) -> None:
    """Export a result as DICOM: derived image series, SEG and Parametric Maps; optionally send them to a PACS."""
    from medidiff.export import export_dicom
    from medidiff.export.review import review_sheet

    if fmt not in ("dicom", "review", "both"):
        console.print(f"[red]error:[/red] --format must be dicom, review or both; got {escape(fmt)}.")
        raise typer.Exit(2)
    if fmt == "review":
        if send is not None or deidentify:
            console.print(
                "[red]error:[/red] --send and --deidentify apply to DICOM objects: use --format dicom or both."
            )
            raise typer.Exit(2)
        with _stage_errors():
            files = review_sheet(result_dir, out)
        console.print(
            f"Review sheet: [bold]{escape(str(files['pdf']))}[/bold]; index: {escape(str(files['index']))}"
        )
        return
    with _stage_errors():
        record = export_dicom(
            result_dir,
            out,
            source_dir=source,
            input_root=input_root or (),
            seg_type=seg_type,
            deidentify=deidentify,
            review=fmt == "both",
        )
    table = Table(title=f"DICOM export of a {record['result_kind']} result")
    for col in ("folder", "what", "SOP class", "files"):
        table.add_column(col)
    for obj in record["objects"]:
        table.add_row(obj["folder"], obj["what"], obj["sop_class"], str(len(obj["files"])))
    console.print(table)
    if record["deidentified"]:
        console.print(
            "De-identified (PS3.15 basic profile; UIDs and patient id keyed with the project's key)."
        )
    if record["new_study"]:
        console.print("No DICOM source given: the objects form a new study that holds the input volume.")
    console.print(f"Outputs in [bold]{escape(str(out))}[/bold] (export.json lists them)")
    if fmt == "both":
        console.print(
            f"Review sheet: [bold]{escape(str(out / 'review.pdf'))}[/bold] (also as an Encapsulated PDF "
            f"object); index: {escape(str(out / 'index.html'))}"
        )
    if send is not None:
        from medidiff.export.pacs import PacsError, export_files, load_profile
        from medidiff.export.pacs import send as send_files

        try:
            profile = load_profile(send, pacs_config)
            files = export_files(out)
            report = send_files(files, profile, notify=_say)
        except PacsError as e:
            console.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(1) from e
        console.print(
            f"Sent {report.stored} instances to {escape(profile.name)} ({profile.host}:{profile.port}); every "
            f"series found again by C-FIND ({len(report.series)} series)."
        )


@app.command(
    epilog=(
        "Example:\n\n  MEDIDIFF_HOME=$PWD MEDIDIFF_DROP=/data/drop MEDIDIFF_DATA=/data/medidiff medidiff serve\n\n"
        "Serves the deployments of prefect.yaml (schedules included) from this process, without a work pool; "
        "docs/flows.md covers work pools and workers."
    )
)
def serve(
    prefect_yaml: Annotated[
        Path | None, typer.Option(help="Deployments file (default: the repository's).")
    ] = None,
    only: Annotated[list[str] | None, typer.Option(help="Serve only this deployment (repeatable).")] = None,
) -> None:
    """Serve the Prefect deployments (nightly ingest and pipeline, weekly training, on-demand runs)."""
    from flows.serve import PREFECT_YAML, deployments_from_yaml

    try:
        deployments = deployments_from_yaml(prefect_yaml or PREFECT_YAML, only)
    except (KeyError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    from prefect import serve as prefect_serve

    prefect_serve(*deployments)


pacs_app = typer.Typer(help="A PACS on loopback for tests and demos (Orthanc).", no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("serve")
def pacs_serve(
    folder: Annotated[Path, typer.Argument(help="Where Orthanc keeps its configuration and storage.")],
    profile_name: Annotated[
        str, typer.Option("--profile", help="Profile whose ports and AE titles to use.")
    ] = "local",
    pacs_config: Annotated[
        Path | None, typer.Option(help="PACS profiles file (default: configs/pacs.yaml).")
    ] = None,
) -> None:
    """Start Orthanc on loopback with a configuration medidiff writes (until Ctrl-C)."""
    from medidiff.export.pacs import PacsError, load_profile, start_orthanc

    try:
        profile = load_profile(profile_name, pacs_config)
        running = start_orthanc(folder, profile)
    except PacsError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    console.print(
        f"Orthanc is up: DICOM {profile.called_aet}@{profile.host}:{profile.port}, web viewer and DICOMweb on "
        f"http://127.0.0.1:{profile.http_port}/ (storage in {escape(str(folder))}). Ctrl-C stops it."
    )
    try:
        running.process.wait()
    except KeyboardInterrupt:
        running.stop()


def run() -> None:  # pragma: no cover - console entry point helper
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    app()
