"""Batches: a CSV manifest of image pairs in, one output folder per pair and a report out.

The manifest has a header line; its columns are ``reference`` and ``floating`` and, optionally,
``reference_mask``, ``floating_mask``, ``ignore_mask`` and ``id`` (by default the floating file's
name without its suffix, or its DICOM series folder's name); its columns are separated by commas,
semicolons or tabs, as the header line shows. Relative paths are relative to the manifest's folder.
Pair ``id`` is registered by :func:`registration.register` and saved by
:meth:`RegistrationResult.save` into ``OUTPUT/id/``: the files ``register`` writes, all of them or
none. ``OUTPUT/report.csv`` and ``OUTPUT/report.json`` get one row per pair; ``OUTPUT/labels.csv``
one per label of each pair whose masks are label maps, measured label by label (only its header
when there are none).

A pair that cannot be registered (a missing file, a NaN image, 2D against 3D) is reported as
failed and the batch goes on; options that no pair can run with (:class:`SettingsError`,
:class:`DeviceError`) stop it.

Resuming: once a pair's files are in place, its ``metrics.json`` is replaced by one with a
``batch`` entry that records the pair's inputs, the options and the files written. A later run
skips every pair whose entry matches its inputs and options and whose files are all there, and
registers the others again. Ctrl-C or ``cancel`` leaves finished pairs as they are and the one
being registered as it was; the report is written for what finished.

Under ``torchrun --nproc_per_node N`` process ``rank`` registers the pairs ``i`` with
``i % N == rank``, on the GPU of its local rank where there are GPUs; the rows are gathered over
gloo, and rank 0 writes the report.
"""

from __future__ import annotations

import collections
import csv
import datetime
import inspect
import json
import re
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import SimpleITK as sitk
import torch.distributed as dist

from . import imageio
from .devices import resolve_device
from .distributed import join_process_group
from .errors import DeviceError, ManifestError, OutputError, RegistrationCancelled, SARError, SettingsError
from .finetuning import CancelCheck, ProgressCallback
from .metrics import OVERLAP_MEASURES
from .model import SARModel, load_model
from .registration import network_dimension, register, uses_network
from .staging import interrupts_recorded, staged_output_dir

IMAGE_COLUMNS = ("reference", "floating", "reference_mask", "floating_mask", "ignore_mask")
PAIR_COLUMNS = (*IMAGE_COLUMNS, "id")
REPORT_FILES = ("report.csv", "report.json", "labels.csv")
# Statuses of a report row; the first two are success.
REGISTERED, SKIPPED, FAILED, INTERRUPTED, NOT_STARTED = \
    "registered", "skipped", "failed", "interrupted", "not started"
# Each overlap measure before and after: dice_before, dice_after, hd95_mm_before, ...
MEASURE_COLUMNS = tuple(f"{name}_{when}" for name in OVERLAP_MEASURES for when in ("before", "after"))
REPORT_COLUMNS = ("id", "status", "error", *MEASURE_COLUMNS, "folding_fraction", "iterations",
                  "optimisation_iterations", "seconds", "device", "rank", "reference", "floating")
LABEL_COLUMNS = ("id", "label", *MEASURE_COLUMNS)
# The options of a batch are those of register() but what each pair brings.
_REGISTER_PARAMETERS = inspect.signature(register).parameters
REGISTER_OPTIONS = tuple(name for name in _REGISTER_PARAMETERS if name not in (
    *IMAGE_COLUMNS, "model", "progress", "cancel"))
# Ranks that finish their share wait at the report's gather for the slowest: as long as a batch
# may run, where PyTorch's default (30 minutes) would end one whose shares differ by more.
REPORT_WAIT = datetime.timedelta(days=7)
# Characters that cannot be in a folder name on Linux, macOS or Windows, and control characters.
_UNSAFE_CHARACTERS = re.compile(r'[\x00-\x1f<>:"/\\|?*]')


@dataclass(frozen=True)
class Pair:
    """One registration of a batch: its image files and the name of its output folder."""

    id: str
    reference: Path
    floating: Path
    reference_mask: Path | None = None
    floating_mask: Path | None = None
    ignore_mask: Path | None = None

    def inputs(self) -> dict:
        """The image files by column, as text (None where the pair has none)."""
        return {name: None if getattr(self, name) is None else str(getattr(self, name)) for name in IMAGE_COLUMNS}


def read_pairs(csv_path) -> list[Pair]:
    """The pairs of a manifest (see the module docstring), checked before any work is done.

    Raises :class:`ManifestError` naming the line for a missing file or column, an unknown
    column, a row without its reference or floating image, and an id that is not unique (case
    ignored, as on macOS and Windows) or not usable as a folder name. The image files themselves
    are checked when their pair is registered, so one bad pair does not stop the batch.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"The pairs file {str(csv_path)!r} does not exist.")
    folder = csv_path.absolute().parent
    with open(csv_path, newline="", encoding="utf-8-sig") as stream:  # utf-8-sig: spreadsheets write a BOM
        first = stream.readline()
        stream.seek(0)
        # Spreadsheets set to a decimal comma save "CSV" with semicolons; others save tabs. The header
        # holds only column names, so the separator it uses is the file's.
        reader = csv.reader(stream, delimiter=next((mark for mark in ",;\t" if mark in first), ","))
        header = [name.strip() for name in next(reader, [])]
        _check_header(header, csv_path.name)
        pairs, places = [], []
        for cells in reader:
            where = f"line {reader.line_num} of {csv_path.name}"
            cells = [cell.strip() for cell in cells]
            if not any(cells):  # spreadsheets end files with empty rows
                continue
            if any(cells[len(header):]):
                raise ManifestError(f"{where} has {len(cells)} fields but the header names {len(header)}.")
            row = dict(zip(header, cells + [""] * (len(header) - len(cells))))
            for column in ("reference", "floating"):
                if not row[column]:
                    raise ManifestError(f"{where} gives no {column} image.")
            paths = {column: folder / Path(row[column]).expanduser() if row.get(column) else None
                     for column in IMAGE_COLUMNS}
            pairs.append(Pair(id=row.get("id") or _name_without_suffix(paths["floating"]), **paths))
            places.append(where if row.get("id") else f"{where} (its floating file's name, as it has no id)")
    if not pairs:
        raise ManifestError(f"The pairs file {str(csv_path)!r} lists no pairs.")
    _check_ids([pair.id for pair in pairs], places)
    return pairs


def run_batch(pairs, output_dir, *, model: SARModel | None = None, qa_figure: bool = True,
              progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
              **register_options) -> list[dict]:
    """Register every pair into ``output_dir/<id>/``, skipping those already done; write the report.

    Args:
        pairs: :class:`Pair` objects, as :func:`read_pairs` gives them.
        output_dir: the batch's folder: a folder per pair, and ``report.csv`` / ``report.json``.
        model: a loaded model for every pair that runs the network; by default the ``weights``
            file (loaded once, and first: a bad file stops the batch before any pair), or the
            shipped weights of the dimension each pair needs (each loaded once).
        qa_figure: also write each pair's ``qa.png``.
        progress: ``progress(fraction, message)`` over this process's pairs (its share under torchrun).
        cancel: ``cancel()`` returning true stops the batch as Ctrl-C does, with
            :class:`RegistrationCancelled` once the report is written.
        register_options: keywords of :func:`registration.register` (``mode``, ``device``,
            ``max_iterations``, ``network``, ...), the same for every pair.

    Returns the report's rows, one per pair in the manifest's order (all of them on every rank).
    Each has the columns of :data:`REPORT_COLUMNS`; the status is :data:`REGISTERED`,
    :data:`SKIPPED` (done by an earlier run), :data:`FAILED` (the error says why),
    :data:`INTERRUPTED` or :data:`NOT_STARTED`. On Ctrl-C the ``KeyboardInterrupt`` is raised
    again once the report is written.
    """
    pairs = list(pairs)
    _check_ids([pair.id for pair in pairs], [f"pair {number}" for number in range(1, len(pairs) + 1)])
    options = _all_options(register_options)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"The output folder {str(output_dir)!r} is a file, not a folder; choose another name.")
    rank, world_size, device = join_process_group(resolve_device(options["device"]), "gloo", REPORT_WAIT)
    options["device"] = str(device)  # under torchrun, this rank's GPU
    done_with = _record(options, qa_figure, model)
    model_for = _model_source(model, options, device)
    show = progress or (lambda fraction, message: None)

    share = range(rank, len(pairs), world_size)
    rows, interruption, current = {}, None, None
    try:
        for position, index in enumerate(share):
            if cancel is not None and cancel():
                raise RegistrationCancelled("The batch was cancelled.")
            current, pair = index, pairs[index]
            rows[index] = _registered_pair(
                pair, output_dir / pair.id, model_for, options, done_with, qa_figure, rank,
                lambda fraction, message: show((position + fraction) / len(share),
                                               f"{pair.id} ({position + 1}/{len(share)}): {message}"), cancel)
    except (KeyboardInterrupt, RegistrationCancelled) as error:
        interruption = error
        if current is not None and current not in rows:
            rows[current] = _row(pairs[current], INTERRUPTED, rank, options["device"],
                                 error="interrupted; the next run registers it again")
    for index in share:
        rows.setdefault(index, _row(pairs[index], NOT_STARTED, rank, None))
    show(1.0, "done")

    ordered, interrupted_late = _merged_report(rows, len(pairs), output_dir, rank, world_size)
    if interruption is None and interrupted_late:
        interruption = KeyboardInterrupt()
    if isinstance(interruption, RegistrationCancelled):
        finished = sum(row["status"] in (REGISTERED, SKIPPED) for row in ordered)
        raise RegistrationCancelled(f"The batch was cancelled: {finished} of {len(pairs)} pairs are done and "
                                    f"intact; {output_dir / REPORT_FILES[0]} lists them.") from None
    if interruption is not None:
        raise interruption
    return ordered


def _merged_report(rows: dict, count: int, output_dir: Path, rank: int, world_size: int) -> tuple[list[dict], bool]:
    """Every rank's ``{pair index: row}`` gathered, in the manifest's order, and written by rank 0;
    and whether Ctrl-C came meanwhile.

    Ctrl-C is held back here: a rank that finished its share early waits here for the others,
    and torchrun hands its SIGINT to all of them at once.
    """
    with interrupts_recorded() as interrupts:
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rows)
            rows = {index: row for share_rows in gathered for index, row in share_rows.items()}
        ordered = [rows[index] for index in range(count)]
        if rank == 0:
            write_report(output_dir, ordered)
        if world_size > 1:
            dist.barrier()  # no rank ends (and, failing, has torchrun stop the others) before the report is written
    return ordered, bool(interrupts)


def succeeded(rows: list[dict]) -> bool:
    """Whether every pair of a report is registered (now or by an earlier run)."""
    return all(row["status"] in (REGISTERED, SKIPPED) for row in rows)


def write_report(output_dir, rows: list[dict]) -> list[Path]:
    """:data:`REPORT_FILES` in ``output_dir``: all, or on any error none.

    ``report.csv`` has a row per pair (:data:`REPORT_COLUMNS`), ``report.json`` the same rows with
    each pair's per-label measures, and ``labels.csv`` a row per label of each pair measured label
    by label (:data:`LABEL_COLUMNS`), which sorts and pivots across a cohort as it is."""
    counts = collections.Counter(row["status"] for row in rows)
    labels = [{"id": row["id"], "label": label, **measures}
              for row in rows for label, measures in (row.get("labels") or {}).items()]
    with staged_output_dir(output_dir) as staging:
        for name, columns, table in ((REPORT_FILES[0], REPORT_COLUMNS, rows), (REPORT_FILES[2], LABEL_COLUMNS, labels)):
            with open(staging / name, "w", newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, columns, extrasaction="ignore")  # report.csv: not the labels
                writer.writeheader()
                writer.writerows(table)
        (staging / REPORT_FILES[1]).write_text(json.dumps({"counts": dict(counts), "rows": rows}, indent=2) + "\n")
    return [Path(output_dir) / name for name in REPORT_FILES]


def completed_metrics(pair_dir, done_with: dict) -> dict | None:
    """The metrics of a pair's earlier outputs if they are complete and were made as ``done_with``
    (:func:`_record`) says: its ``batch`` entry matches and every file it lists is there; else None."""
    try:
        metrics = json.loads((Path(pair_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    entry = metrics.get("batch") if isinstance(metrics, dict) else None
    if not isinstance(entry, dict) or any(entry.get(key) != value for key, value in done_with.items()):
        return None
    outputs = entry.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all((Path(pair_dir) / name).is_file() for name in outputs):
        return None
    return metrics


def _registered_pair(pair: Pair, pair_dir: Path, model_for, options: dict, done_with: dict, qa_figure: bool,
                     rank: int, progress, cancel) -> dict:
    """The report row of one pair: its earlier outputs, or a registration now, or its failure."""
    earlier = completed_metrics(pair_dir, {**done_with, "inputs": pair.inputs()})
    if earlier is not None:
        return _row(pair, SKIPPED, rank, options["device"], earlier)
    try:
        result = register(pair.reference, pair.floating, model_for(pair), reference_mask=pair.reference_mask,
                          floating_mask=pair.floating_mask, ignore_mask=pair.ignore_mask, **options,
                          progress=progress, cancel=cancel)
        written = result.save(pair_dir, qa_figure=qa_figure)
        # The batch entry is written last, once every file is in place: it is what marks the pair done.
        metrics = {**result.metrics, "batch": {**done_with, "inputs": pair.inputs(),
                                               "outputs": sorted(path.name for path in written)}}
        with staged_output_dir(pair_dir) as staging:
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    except (RegistrationCancelled, SettingsError, DeviceError):
        raise
    except Exception as error:  # noqa: BLE001 - one pair's failure, whatever it is, must not end the batch
        message = str(error) if isinstance(error, SARError) else f"{type(error).__name__}: {error}"
        return _row(pair, FAILED, rank, options["device"], error=message)
    return _row(pair, REGISTERED, rank, options["device"], metrics)


def _row(pair: Pair, status: str, rank: int, device: str | None, metrics: dict | None = None,
         error: str | None = None) -> dict:
    """A report row (:data:`REPORT_COLUMNS`, and ``labels``: each label's measures, for label maps
    measured label by label, else None); measures are None where the pair has none."""
    metrics = metrics or {}
    before, after = metrics.get("before", {}), metrics.get("after", {})
    labels = {label: _measures(before.get("labels", {}).get(label, {}), values)
              for label, values in after.get("labels", {}).items()} or None
    return {"id": pair.id, "status": status, "error": error, **_measures(before, after),
            "folding_fraction": metrics.get("folding_fraction"), "iterations": metrics.get("iterations"),
            "optimisation_iterations": (metrics.get("instance_optimisation") or {}).get("iterations"),
            "seconds": metrics.get("seconds"), "device": metrics.get("device", device), "rank": rank,
            "reference": str(pair.reference), "floating": str(pair.floating), "labels": labels}


def _measures(before: dict, after: dict) -> dict:
    """:data:`MEASURE_COLUMNS` of one structure's measures before and after (None where absent)."""
    return {f"{name}_{when}": values.get(name) for name in OVERLAP_MEASURES
            for when, values in (("before", before), ("after", after))}


def _all_options(register_options: dict) -> dict:
    """Every option of register(), the given ones and the defaults of the others."""
    unknown = sorted(set(register_options) - set(REGISTER_OPTIONS))
    if unknown:
        raise TypeError(f"register() has no option {', '.join(unknown)}; a batch takes {', '.join(REGISTER_OPTIONS)}.")
    return {name: register_options.get(name, _REGISTER_PARAMETERS[name].default) for name in REGISTER_OPTIONS}


def _record(options: dict, qa_figure: bool, model: SARModel | None) -> dict:
    """What a pair's outputs are made with, as it reads back from JSON. The device is left out:
    a pair done on the CPU is not redone on a GPU."""
    def plain(value):
        return asdict(value) if is_dataclass(value) else str(value) if isinstance(value, Path) else value

    record = {"options": {name: plain(value) for name, value in options.items() if name != "device"},
              "qa_figure": qa_figure,
              "model": None if model is None else model.metadata.get("weights_path", "in memory")}
    return json.loads(json.dumps(record))


def _model_source(model: SARModel | None, options: dict, device):
    """A function of a pair that gives the model it runs (None: no network), each loaded once."""
    if not uses_network(options["network"], model, options["weights"]):
        return lambda pair: None
    if model is None and options["weights"] is not None:
        model = load_model(options["weights"], device=device)
    if model is not None:
        return lambda pair: model
    shipped = {}

    def shipped_model(pair: Pair) -> SARModel | None:
        ndims = _file_dimension(pair.reference)
        if ndims is None:
            return None  # register() reads the file and says what is wrong with it
        wanted = network_dimension(ndims, options["mode"])
        if wanted not in shipped:
            shipped[wanted] = load_model(None, wanted, device)
        return shipped[wanted]

    return shipped_model


def _file_dimension(path: Path) -> int | None:
    """The dimension an image file's header gives, or None when it cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetDimension()


def _check_header(header: list[str], name: str) -> None:
    if not any(header):
        raise ManifestError(f"{name} has no header line: its first line must name the columns, among "
                            f"{', '.join(PAIR_COLUMNS)}.")
    unknown = [column for column in header if column not in PAIR_COLUMNS]
    if unknown:
        raise ManifestError(f"{name} has the unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                            f"{', '.join(PAIR_COLUMNS)} (reference and floating are needed).")
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise ManifestError(f"{name} names the column(s) {', '.join(repeated)} twice.")
    missing = [column for column in ("reference", "floating") if column not in header]
    if missing:
        raise ManifestError(f"{name} has no {' or '.join(missing)} column; the columns are {', '.join(PAIR_COLUMNS)}.")


def _check_ids(ids: list[str], places: list[str]) -> None:
    """Every id must name a folder of its own: unique (case ignored) and a plain, safe name.
    ``places`` says where each id comes from, for the messages."""
    seen = {}
    for pair_id, place in zip(ids, places):
        if (not pair_id or pair_id != pair_id.strip() or pair_id.startswith(".") or pair_id.endswith(".")
                or _UNSAFE_CHARACTERS.search(pair_id) or pair_id.lower() in REPORT_FILES):
            raise ManifestError(f"The id {pair_id!r} of {place} cannot name an output folder: it must not be "
                                "empty, start or end with a dot or a space, be a report's name, or hold any of "
                                "/ \\ < > : \" | ? * or control characters.")
        if pair_id.casefold() in seen:
            raise ManifestError(f"{seen[pair_id.casefold()]} and {place} both have the id {pair_id!r}; give each "
                                "pair an id of its own in the id column.")
        seen[pair_id.casefold()] = place


def _name_without_suffix(path: Path) -> str:
    """A file's name without its image suffix (``scan.nii.gz`` -> ``scan``); a folder's (a DICOM
    series') whole name, dots and all (``CT.2024.01`` stays so)."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in sorted(imageio.SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return path.stem
