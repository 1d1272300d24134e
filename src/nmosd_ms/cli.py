"""The ``nmosd-ms`` command line: one verb per workflow step.

Only argument handling lives here; each verb calls one library function. User errors
(:class:`~nmosd_ms.errors.NmosdError`, invalid options) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from .config import (
    CVConfig,
    Device,
    DifficultyName,
    ExecutorName,
    PrepareConfig,
    PretrainConfig,
    SegmentConfig,
    TrainConfig,
)
from .constants import __version__
from .errors import NmosdError

out = Console()
err = Console(stderr=True)


def _error_line(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    _error_line(message)
    raise typer.Exit(code)


#: click's exception classes as this typer raises them (recent typer vendors its own click,
#: which has no ``Abort``: it lets KeyboardInterrupt through; older typer uses click's Abort).
_clickexc = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_clickexc, "NoArgsIsHelpError", ())
_INTERRUPTED = (KeyboardInterrupt, *((_clickexc.Abort,) if hasattr(_clickexc, "Abort") else ()))


def _closed_pipe() -> None:
    """stdout's reader went away (``nmosd-ms cv --help | head -1``): stop quietly, as the Python
    documentation advises, so that the interpreter's final flush does not fail again."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(1)


class _OneLineUsageErrors(TyperGroup):
    """Option errors that click itself finds (a value under ``min``, a missing or unknown
    option) are printed by click as a usage block and a boxed message; here they become the
    same single ``error:`` line, exit 2, as every other user error."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _NoArgsIsHelp:  # bare ``nmosd-ms``: the help, as usual
            return super().main(*args, standalone_mode=True, **kwargs)
        except _clickexc.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            _error_line(
                f"{exc.format_message()} (see {ctx.command_path if ctx else 'nmosd-ms'} --help)"
            )
            sys.exit(exc.exit_code)
        except _INTERRUPTED:
            _error_line("interrupted")
            sys.exit(130)
        except BrokenPipeError:
            _closed_pipe()
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Tell NMOSD from MS on 3D T2-FLAIR white-matter-lesion maps (research use only).",
    pretty_exceptions_enable=False,
)


def user_errors(fn):
    """Turn user errors into one line + exit 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NmosdError as exc:
            hint = f" ({flag_of(exc.option)})" if exc.option else ""
            fail(f"{exc}{hint}", exc.exit_code)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", "")).removeprefix("Value error, ")
            fail(f"invalid option {flag_of(where) if where else ''}: {msg}")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            _closed_pipe()
        except MemoryError:
            fail("not enough memory for this step (see the README's limits)")
        except OSError as exc:  # the file system refused (permissions, a full disk, a file
            # where a folder is needed): the user's environment, not a bug
            where = f" {exc.filename}" if exc.filename else ""
            fail(f"cannot access{where}: {exc.strerror or exc}")

    return wrapper


class Bar:
    """A rich progress bar driven by ``callback(done, total)``."""

    def __init__(self, label: str):
        self.label = label
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        self.task = None

    def __enter__(self):
        return self  # the display starts with the first progress report

    def __exit__(self, *exc):
        if self.task is None:  # nothing was shown (e.g. bad input found before any work)
            return
        if exc[0] is None:
            self.progress.__exit__(*exc)
            return
        # on an error, leave only the error line on stderr: a terminal erases the bar
        # (transient); elsewhere (a pipe, a log file) stopping would print the last frame and a
        # blank line before the error, so the console is silenced while the display stops
        self.progress.live.transient = True
        quiet = err.quiet
        err.quiet = quiet or not err.is_terminal
        try:
            self.progress.__exit__(*exc)
        finally:
            err.quiet = quiet

    def __call__(self, done: int, total: int, label: str | None = None) -> None:
        if self.task is None:
            from .pools import threads_without_stop_signals

            with threads_without_stop_signals():  # the display's thread: Ctrl-C is not for it
                self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(
            self.task, completed=done, total=total, description=label or self.label
        )
        _log_progress(label or self.label, done, total)


#: Names a file to which every progress report is appended as one line, ``label<TAB>done<TAB>
#: total`` (the first one, ``0``, when the work starts), for whatever follows a run without a
#: terminal: a job monitor, a wrapper's progress display, the tests that interrupt a run.
PROGRESS_FILE = "NMOSD_MS_PROGRESS_FILE"


def _log_progress(label: str, done: int, total: int) -> None:
    import os

    path = os.environ.get(PROGRESS_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as log:  # one short line per write: O_APPEND
            log.write(f"{label}\t{done}\t{total}\n")


#: Torch threads of a command that trains one model (``fit``, ``pretrain``); ``cv`` has its own
#: per-fold rule.
Threads = Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")]


#: Library parameter names whose flag is not ``--`` + the name with dashes.
FLAGS = {
    "model_sizes": "--model-size",
    "out": "--out",
    "segment_drop_symmetric": "--drop-symmetric/--keep-symmetric",
    "drop_symmetric": "--drop-symmetric/--keep-symmetric",
    "min_volume_mm3": "--min-volume",
    "min_seed_mm3": "--min-seed",
    "edge_mm": "--edge",
    "background_mm": "--background",
    "csf_margin_mm": "--csf-margin",
    "rim_mm": "--rim",
    "max_pair_mm3": "--max-pair",
}


def flag_of(option: str) -> str:
    """The command-line flag that sets the library parameter ``option``."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _config_parameters(config_cls) -> list[inspect.Parameter]:
    """One typer option per field of a pydantic option set (TrainConfig, PrepareConfig,
    SegmentConfig): name, type (Literal fields become choices), default and help come from the
    config itself, so each option is declared once; pydantic validates the values (its errors
    become one ``error:`` line naming the flag)."""
    params = []
    for name, field in config_cls.model_fields.items():
        kind = field.annotation
        flag = flag_of(name)
        if kind is bool:
            decl = (flag,) if "/" in flag else (f"{flag}/--no-{flag[2:]}",)
        else:
            decl = (flag,)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=Annotated[kind, typer.Option(*decl, help=field.description or "")],
            )
        )
    return params


def config_options(config_cls):
    """Give a verb every field of ``config_cls`` as an option; it receives them as
    ``config_values`` (a dict of the values) and ``config_given`` (the names set on the command
    line, e.g. to override a run's recorded options)."""

    def decorate(fn):
        extra = _config_parameters(config_cls)
        names = [p.name for p in extra]
        sig = inspect.signature(fn, eval_str=True)
        own = [
            p for p in sig.parameters.values() if p.name not in ("config_values", "config_given")
        ]
        clash = set(names) & {p.name for p in own}
        assert not clash, f"{fn.__name__}: parameters {clash} clash with {config_cls.__name__}"
        ctx_param = inspect.Parameter(
            "_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ctx = kwargs.pop("_ctx")
            values = {n: kwargs.pop(n) for n in names}
            given = {
                n
                for n in names
                if ctx.get_parameter_source(n) is not None
                and ctx.get_parameter_source(n).name == "COMMANDLINE"
            }
            return fn(*args, config_values=values, config_given=given, **kwargs)

        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        wrapper.__signature__ = sig.replace(
            parameters=[
                *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in positional],
                *keyword,
                *extra,
                ctx_param,
            ]
        )
        del wrapper.__wrapped__  # typer must read the signature above, not the function's own
        return wrapper

    return decorate


def _version(value: bool):
    if value:
        out.print(f"nmosd-ms {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
):
    """nmosd-ms: phantom -> prepare -> cv -> report -> export -> predict."""


@app.command()
@user_errors
@config_options(PrepareConfig)
def prepare(
    dataset: Annotated[Path, typer.Argument(help="BIDS folder or manifest .tsv/.csv")],
    out_dir: Annotated[Path, typer.Option("--out", help="cache folder to write")],
    lesions: Annotated[str, typer.Option(help="BIDS derivatives pipeline with lesion masks")] = (
        "lesions"
    ),
    label_column: Annotated[str, typer.Option(help="participants.tsv label column")] = "diagnosis",
    bids_filter: Annotated[
        list[str] | None,
        typer.Option(
            help="ENTITY=VALUE (repeatable) choosing among several FLAIRs of a participant and "
            "session, e.g. acq=3D or run=1"
        ),
    ] = None,
    bids_filter_file: Annotated[
        Path | None,
        typer.Option(
            help='JSON: {"flair": {...}, "lesion_mask": {...}, "brain_mask": {...}} entity '
            "filters per image, as fMRIPrep's --bids-filter-file"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="subjects processed in parallel")] = 1,
    config_values: dict | None = None,
    config_given: set | None = None,
):
    """Crop, reorient and resize a cohort into model-ready S³ volumes."""
    from .data.bids import parse_bids_filters
    from .data.cache import prepare as run_prepare
    from .data.dataset import load_cohort

    config = PrepareConfig(**config_values)
    filters = parse_bids_filters(bids_filter, bids_filter_file)
    cohort = load_cohort(
        dataset, lesions, label_column, not config.segment_missing, filters=filters
    )
    with Bar("prepare") as bar:
        summary = run_prepare(cohort, out_dir, config, workers=workers, progress=bar)
    out.print(
        f"prepared {summary['n_subjects']} subjects ({summary['counts']['NMOSD']} NMOSD, "
        f"{summary['counts']['MS']} MS; {summary['reused']} reused) -> {out_dir}"
    )


def _precision_note(precision: str, device: str) -> None:
    """A line on stdout when the precision asked for is slow here (stderr is kept for errors)."""
    from .training.device import precision_note

    note = precision_note(precision, device)
    if note:
        out.print(f"note: {note}", markup=False, soft_wrap=True)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()):
        raise NmosdError(f"--shard expects I/N (like 2/8), got '{value}'")
    return int(i), int(n)


def _parse_model_sizes(values: list[str]) -> dict[str, int]:
    sizes = {}
    for v in values:
        name, _, num = v.partition("=")
        if not num.isdigit():
            raise NmosdError(f"--model-size expects MODEL=SIZE, got '{v}'")
        sizes[name.strip()] = int(num)
    return sizes


@app.command()
@user_errors
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="new folder for the synthetic BIDS cohort")],
    n_nmosd: Annotated[int, typer.Option(min=0, help="NMOSD-like subjects")] = 41,
    n_ms: Annotated[int, typer.Option(min=0, help="MS-like subjects")] = 47,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same cohort)")] = 0,
    difficulty: Annotated[
        DifficultyName,
        typer.Option(
            help="how much the classes differ in lesion load and in lesion pattern (spatial: "
            "identical loads, the pattern is the only signal)"
        ),
    ] = "paper",
    resolution: Annotated[int, typer.Option(help="template resolution in mm (1 or 2)")] = 2,
    workers: Annotated[int, typer.Option(min=1, help="subjects generated in parallel")] = 1,
    lesion_free_fraction: Annotated[
        float,
        typer.Option(
            help="share of NMOSD subjects without brain lesions (default 0: as in the paper, "
            "every patient has lesions; 0.35-0.40 of AQP4-NMOSD patients in general)"
        ),
    ] = 0.0,
    site: Annotated[
        str,
        typer.Option(
            help="letters/digits prefixing every participant label (sub-<site>001), so that "
            "cohorts made as different sites share no IDs"
        ),
    ] = "",
):
    """Generate a synthetic NMOSD/MS cohort (BIDS) from the MNI152 template."""
    from .phantom import generate_cohort

    with Bar("phantom") as bar:
        df = generate_cohort(
            out_dir,
            n_nmosd,
            n_ms,
            seed,
            difficulty,
            resolution,
            workers,
            bar,
            lesion_free_fraction=lesion_free_fraction,
            site=site,
        )
    counts = df["diagnosis"].value_counts()
    out.print(
        f"wrote {len(df)} subjects ({counts.get('NMOSD', 0)} NMOSD, "
        f"{counts.get('MS', 0)} MS) -> {out_dir}"
    )


@app.command()
@user_errors
@config_options(TrainConfig)
def cv(
    cache_dir: Annotated[Path, typer.Argument(help="prepared cache (nmosd-ms prepare)")],
    out_dir: Annotated[Path, typer.Option("--out", help="run folder (resumed if it exists)")],
    models: Annotated[str, typer.Option(help="comma-separated model names")] = (
        "twoview-18,resnet3d-18"
    ),
    repeats: Annotated[int, typer.Option(min=1)] = 15,
    folds: Annotated[int, typer.Option(min=2)] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[Device, typer.Option(help="where torch models train")] = "auto",
    model_size: Annotated[
        list[str] | None, typer.Option(help="MODEL=S: smaller input size for one model")
    ] = None,
    executor: Annotated[ExecutorName, typer.Option(help="where folds are trained")] = "local",
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Dask LocalCluster workers")] = 2,
    folds_per_device: Annotated[
        int,
        typer.Option(
            min=1,
            help="--executor dask on GPUs: folds trained at once on each GPU, each in its own "
            "worker process (a small network leaves most of a large GPU idle)",
        ),
    ] = 1,
    threads: Annotated[
        int, typer.Option(min=0, help="torch threads per fold (0: all cores / per Dask worker)")
    ] = 0,
    shortcut: Annotated[
        bool,
        typer.Option(
            help="also run lesionload-stump (the best single threshold on lesion load), so the "
            "report shows the shortcut beside each deep model"
        ),
    ] = True,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: train only shard I of N (a job array's task; scripts/slurm/), the "
            "splits being identical in every shard"
        ),
    ] = None,
    collect: Annotated[
        bool,
        typer.Option(
            help="train nothing: check every fold is finished, write the tables (after the shards)"
        ),
    ] = False,
    config_values: dict | None = None,
    config_given: set | None = None,
):
    """Repeated stratified k-fold cross-validation (paper: 5 folds x 15 repeats).

    Several cv commands with the same options may work on one --out folder at once (each fold
    is trained once); one with other options is refused."""
    from .training.cv import collect_cv, executor_for, run_cv

    config = CVConfig(
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        repeats=repeats,
        folds=folds,
        seed=seed,
        model_sizes=_parse_model_sizes(model_size or []),
        train=TrainConfig(**config_values),
        shortcut=shortcut,
    )
    _precision_note(config.train.precision, device)
    with Bar("cv") as bar:
        if collect:
            if shard:
                raise NmosdError("collect trains nothing: give it no shard", option="shard")
            meta = collect_cv(cache_dir, out_dir, config)
        else:
            meta = run_cv(
                cache_dir,
                out_dir,
                config,
                device=device,
                executor=executor_for(
                    executor, scheduler, workers, threads, device, folds_per_device
                ),
                progress=bar,
                shard=_parse_shard(shard),
            )
    out.print(
        f"cv {'collected' if collect else 'finished'}: {', '.join(config.run_models)} -> "
        f"{meta['folds_table']} "
        f"({meta['trained_here']} fold(s) trained by this command)",
        markup=False,
        soft_wrap=True,
    )
    out.print(f"next: nmosd-ms report {out_dir}")


@app.command()
@user_errors
def models(
    size: Annotated[int, typer.Option(min=8, help="input size S for the FLOP count")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """List the model registry with parameters and FLOPs per forward at size S."""
    import json

    from rich.table import Table

    from .models import model_table

    rows = model_table(size)
    if as_json:
        print(json.dumps([{k: r[k] for k in ("name", "parameters", "flops")} for r in rows]))
        return
    table = Table(title=f"nmosd-ms models (S = {size})")
    for col in ("name", "parameters", "GFLOPs", "description"):
        table.add_column(col)
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "-"
        flops = f"{r['flops'] / 1e9:.2f}" if r["flops"] else "-"
        table.add_row(r["name"], params, flops, r["description"])
    out.print(table)


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a cv run folder")],
):
    """Tables 2 and 3, Figure 4, ROC and per-subject plots, and one HTML page."""
    from .report import build_report, report_status

    index = build_report(run_dir)
    out.print(f"report: {index}")
    status = report_status(index)
    if not status["complete"]:
        done = ", ".join(f"{m} {n}" for m, n in status["finished_folds"].items())
        out.print(
            f"note: the run is not finished (folds finished of {status['planned_folds']}: "
            f"{done}); the report covers the finished folds only",
            markup=False,
            soft_wrap=True,
        )


@app.command()
@user_errors
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="folder for everything the demo writes")
    ] = (Path("demo-output")),
    seed: Annotated[int, typer.Option()] = 0,
    difficulty: Annotated[DifficultyName, typer.Option(help="the synthetic cohort's preset")] = (
        "paper"
    ),
    repeats: Annotated[int, typer.Option(min=1)] = 1,
):
    """The whole workflow on the built-in synthetic cohort (41 NMOSD / 47 MS), in minutes."""
    from .workflow import run_demo

    paths = run_demo(
        out_dir,
        seed=seed,
        difficulty=difficulty,
        repeats=repeats,
        progress=Bar,
        log=lambda m: out.print(m, markup=False),
    )
    out.print(f"report: {paths['report']}")
    out.print("the full paper protocol (15 x 5-fold, 100 epochs) on this cohort:")
    out.print(f"  {paths['full_protocol']}", markup=False, soft_wrap=True)
    out.print(f"  {paths['full_protocol_note']}", markup=False, soft_wrap=True)
    from .training.device import cpu_has_native_bf16

    bf16 = " --precision bf16" if cpu_has_native_bf16() else ""
    out.print(
        f"on a CPU add --executor dask --workers <cores> --threads 1{bf16} "
        "(two-view-18 alone: about an hour on 2 cores with native bf16; the 3D ResNets take "
        "days)",
        markup=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="a cv run folder")],
    model: Annotated[str, typer.Option(help="model to export, e.g. twoview-18")],
    out_dir: Annotated[Path, typer.Option("--out", help="new bundle folder")],
    repeats: Annotated[
        str, typer.Option(help="comma-separated repeats whose fold models form the ensemble")
    ] = "0",
):
    """Bundle a model's fold weights with its preprocessing, metrics and a model card."""
    from .bundle import CARD_NAME
    from .export import export_bundle

    try:
        reps = [int(r) for r in repeats.split(",") if r.strip()]
    except ValueError:
        raise NmosdError(f"--repeats expects integers like 0,1,2, not '{repeats}'") from None
    path = export_bundle(run_dir, model, out_dir, reps)
    out.print(f"bundle: {path} (see {path / CARD_NAME})")


@app.command()
@user_errors
@config_options(TrainConfig)
def fit(
    cache_dir: Annotated[Path, typer.Argument(help="prepared cache")],
    model: Annotated[str, typer.Option(help="model to train on the whole cohort")],
    out_dir: Annotated[Path, typer.Option("--out", help="new bundle folder")],
    from_run: Annotated[
        Path | None,
        typer.Option(
            help="a cv run folder: train exactly as it did (its training options and the "
            "model's input size); options given here override them"
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[Device, typer.Option(help="where the model trains")] = "auto",
    threads: Threads = 0,
    config_values: dict | None = None,
    config_given: set | None = None,
):
    """Train one final model on the whole cohort and bundle it (no held-out estimate)."""
    from .fit import fit_bundle, run_training_config

    size = None
    values = config_values
    if from_run is not None:
        base, size = run_training_config(from_run, model)
        values = {**base.model_dump(), **{k: config_values[k] for k in config_given}}
    train = TrainConfig(**values)
    _precision_note(train.precision, device)
    with Bar("fit") as bar:
        path = fit_bundle(
            cache_dir,
            model,
            out_dir,
            train,
            seed=seed,
            device=device,
            size=size,
            threads=threads,
            progress=bar,
        )
    out.print(f"bundle: {path} (fitted on the whole cohort; performance: see nmosd-ms cv)")


@app.command()
@user_errors
@config_options(PretrainConfig)
def pretrain(
    cache_dir: Annotated[Path, typer.Argument(help="prepared cache of OTHER subjects' maps")],
    out_dir: Annotated[Path, typer.Option("--out", help="new folder for the weights")],
    model: Annotated[str, typer.Option(help="the network the weights are for")] = "twoview-18",
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[Device, typer.Option(help="where the model trains")] = "auto",
    threads: Threads = 0,
    config_values: dict | None = None,
    config_given: set | None = None,
):
    """Self-supervised prior from unlabelled lesion maps (diagnoses unused): the network learns
    which cells of a grid hold lesion. Start cv or fit from it with --weights
    OUT/weights.safetensors; cv refuses it for a cohort whose maps it saw."""
    from .training.pretrain import WEIGHTS_NAME, pretrain_weights

    config = PretrainConfig(**config_values)
    _precision_note(config.precision, device)
    path = pretrain_weights(cache_dir, model, out_dir, config, seed, device, threads)
    out.print(f"weights: {path / WEIGHTS_NAME} (use: --weights {path / WEIGHTS_NAME})")


@app.command()
@user_errors
def predict(
    model_dir: Annotated[Path, typer.Argument(help="a bundle (nmosd-ms export or fit)")],
    lesion_mask: Annotated[Path | None, typer.Option(help="lesion mask NIfTI")] = None,
    flair: Annotated[Path | None, typer.Option(help="FLAIR NIfTI (optional)")] = None,
    brain_mask: Annotated[Path | None, typer.Option(help="brain mask NIfTI (optional)")] = None,
    participant_id: Annotated[str, typer.Option(help="ID of a single subject")] = "subject",
    manifest: Annotated[
        Path | None, typer.Option(help="TSV/CSV: participant_id, lesion_mask[, flair, brain_mask]")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder for the results")] = None,
    saliency: Annotated[bool, typer.Option(help="occlusion saliency maps (NIfTI + PNG)")] = False,
    occlusion_size: Annotated[int, typer.Option(min=2, help="occlusion patch (voxels)")] = 16,
    device: Annotated[Device, typer.Option(help="where the networks and saliency run")] = "auto",
):
    """Predict NMOSD vs MS for new patients with a bundle's fold ensemble."""
    from rich.table import Table

    from .data.ingest import Subject
    from .io import regular_file
    from .predict import load_bundle, predict_subjects, subjects_from_manifest

    if manifest is not None and (lesion_mask or flair or brain_mask):
        raise NmosdError("give either --manifest or --lesion-mask/--flair, not both")
    if manifest is not None:
        subjects = subjects_from_manifest(manifest)
    elif lesion_mask is not None or flair is not None:
        for p, what in ((lesion_mask, "lesion mask"), (flair, "FLAIR"), (brain_mask, "brain mask")):
            if p is not None:
                regular_file(p, what)
        subjects = [Subject(participant_id, "", flair, lesion_mask, brain_mask)]
    else:
        raise NmosdError("nothing to predict: give --lesion-mask (and/or --flair) or --manifest")
    if saliency and out_dir is None:
        raise NmosdError("--saliency needs --out for the maps")
    bundle = load_bundle(model_dir, device)
    with Bar("predict") as bar:
        df = predict_subjects(bundle, subjects, out_dir, saliency, occlusion_size, bar)
    n = len(bundle.models)
    table = Table(title=f"{bundle.info.model} ({n} fold model{'s' if n != 1 else ''})")
    for col in ("participant_id", "P(NMOSD)", "predicted", "fold spread (SD)"):
        table.add_column(col)
    for _, r in df.iterrows():
        table.add_row(
            r["participant_id"] + (" *" if r["note"] else ""),
            f"{r['prob_nmosd']:.3f}",
            r["predicted"],
            f"{r['fold_spread']:.3f}" if r["fold_spread"] == r["fold_spread"] else "–",
        )
    out.print(table)
    for _, r in df[df["note"].astype(bool)].iterrows():
        out.print(f"* {r['participant_id']}: {r['note']}", highlight=False)
    if out_dir is not None:
        from .predict import PREDICTIONS

        out.print(f"written: {out_dir / PREDICTIONS} (a BIDS derivative dataset)")


@app.command()
@user_errors
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="a bundle (nmosd-ms export or fit)")],
    dataset: Annotated[
        Path, typer.Argument(help="labelled external cohort: BIDS folder or manifest .tsv/.csv")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="new folder for the evaluation")],
    lesions: Annotated[str, typer.Option(help="BIDS derivatives pipeline with lesion masks")] = (
        "lesions"
    ),
    label_column: Annotated[str, typer.Option(help="participants.tsv label column")] = "diagnosis",
    bids_filter: Annotated[
        list[str] | None, typer.Option(help="ENTITY=VALUE (repeatable), as in prepare")
    ] = None,
    bids_filter_file: Annotated[
        Path | None, typer.Option(help="JSON entity filters per image, as in prepare")
    ] = None,
    allow_overlap: Annotated[
        bool,
        typer.Option(
            help="evaluate even if participants or input files are in the bundle's training "
            "cohort (flagged on the page); refused by default"
        ),
    ] = False,
    n_resamples: Annotated[int, typer.Option(min=1000, help="bootstrap resamples")] = 9999,
    confidence: Annotated[float, typer.Option(help="level of the intervals")] = 0.95,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    device: Annotated[Device, typer.Option(help="where the networks run")] = "auto",
):
    """Score a bundle on a labelled external cohort: metrics with bootstrap CIs, calibration,
    ROC, the lesion-load baselines it carries, and an HTML page (DIR/report/index.html)."""
    from .bundle import load_bundle
    from .data.bids import parse_bids_filters
    from .data.dataset import load_cohort
    from .evaluate import evaluate_cohort

    filters = parse_bids_filters(bids_filter, bids_filter_file)
    cohort = load_cohort(dataset, lesions, label_column, False, filters=filters)
    bundle = load_bundle(model_dir, device)
    with Bar("evaluate") as bar:
        ev = evaluate_cohort(
            bundle, cohort, out_dir, allow_overlap, n_resamples, confidence, seed, bar
        )
    from rich.table import Table

    from .report.external import metrics_display

    shown = metrics_display(ev.metrics)
    table = Table(title=f"{bundle.info.model} on {len(cohort)} external subjects (95 % CI)")
    cols = ["model", "accuracy", "balanced accuracy", "auc"]
    for col in cols:
        table.add_column(col)
    for _, r in shown.iterrows():
        table.add_row(*(str(r[c]) for c in cols))
    out.print(table)
    for line in ev.record["differences"]:
        out.print(line, markup=False, soft_wrap=True)
    out.print(f"written: {out_dir}/report/index.html and the tables beside it")


@app.command()
@user_errors
@config_options(SegmentConfig)
def segment(
    flair: Annotated[Path, typer.Option(help="FLAIR NIfTI")],
    out_path: Annotated[
        Path, typer.Option("--out", help="mask to write (.nii.gz), or a BIDS derivative folder")
    ],
    brain_mask: Annotated[Path | None, typer.Option(help="brain mask NIfTI (recommended)")] = None,
    skull_stripped: Annotated[
        bool, typer.Option(help="the FLAIR is brain-extracted: its non-zero voxels are the brain")
    ] = False,
    qc: Annotated[
        Path | None,
        typer.Option(help="also write a PNG of axial slices with the WMH outline, for review"),
    ] = None,
    participant_id: Annotated[
        str | None,
        typer.Option(help="--out folder only: the participant (default: from the FLAIR's name)"),
    ] = None,
    session_id: Annotated[
        str, typer.Option(help="--out folder only: the session (ses-<label>), if any")
    ] = "",
    config_values: dict | None = None,
    config_given: set | None = None,
):
    """Segment white-matter hyperintensities from a FLAIR (same grid and affine as the input).

    --out MASK.nii.gz writes one file; --out FOLDER writes (or adds to) a BIDS derivative
    dataset: sub-X/anat/sub-X_space-orig_label-WMH_mask.nii.gz (with ses-Y when the FLAIR has a
    session), its JSON sidecar and a review montage."""
    from .segment import segment_file

    result = segment_file(
        flair,
        out_path,
        brain_mask,
        SegmentConfig(**config_values),
        skull_stripped,
        qc,
        participant_id,
        session_id,
    )
    out.print(f"{result.voxels} voxels ({result.volume_ml:.2f} ml) -> {result.mask_path}")


#: ``--help`` lists the verbs in the order of the workflow, not of their definitions.
WORKFLOW_ORDER = [
    "phantom",
    "segment",
    "prepare",
    "models",
    "pretrain",
    "cv",
    "report",
    "export",
    "fit",
    "predict",
    "evaluate",
    "demo",
]
app.registered_commands.sort(key=lambda c: WORKFLOW_ORDER.index(c.callback.__name__))


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
