"""Batch prediction at archive scale on Apache Beam: `predict`'s outputs for every file of a bucket or folder.

    python -m covidseg_tf.batch_predict 'gs://archive/xrays/**' --output gs://results/run1 \\
        --runner DataflowRunner --project P --region R --temp_location gs://results/tmp ...

The pipeline (`build_pipeline`):

1. **match**: each input pattern through `FileSystems.match` (what `fileio.MatchFiles` runs: local paths and globs,
   ``gs://``, ``s3://``; ``*`` stays inside one folder, ``**`` crosses folders). A local folder or a pattern ending
   in ``/`` means everything below it (``**``). A file matched by two patterns is processed once; files under
   --output are never inputs. A literal path (no glob characters) that does not exist is a dead letter.
2. **stems** (`relative_stem`, `assign_stems`, `resolve_collisions`): each input's output stem is its path relative
   to its pattern's fixed prefix (the part before the first ``*?[``, up to its last ``/``), without the extension,
   under ``<output>/images/``. Stems that would coincide (``a.png`` and ``a.dcm``, the same relative path under two
   patterns, names differing only in case) all get ``-<first 8 hex of sha256(URI)>``; should such a name still meet
   another, those inputs get the full 64-hex hash. So no two inputs share a stem, and the same inputs always get
   the same stems.
3. **read + decode** (`ReadDecodeFn`): bytes through `fileio.ReadableFile` (as `fileio.ReadMatches` gives them),
   then `covidseg_tf.imageio.decode_image` (grey pixels and the file's colour share, for the input gate);
   unreadable files go to the dead letter with the reason.
4. **RunInference** with `CascadeModelHandler`: `load_model` loads `covidseg_tf.inference.Predictor` once per worker
   process (models on ``gs://``/``s3://`` are copied to a local temporary folder first); `run_inference` runs a
   batch (up to --batch-size images, any sizes: the cascade resizes each and returns masks at each input's size)
   through `Predictor.predict`. If a batch fails, its images are retried one by one and only the failing ones go to
   the dead letter.
5. **render + write** (`WriteOutputsFn`): `covidseg_tf.predict.render_outputs` gives exactly `predict`'s four files
   per image (``<stem>_lung.png``, ``<stem>_infection.png`` at the input size, ``<stem>_overlay.png``,
   ``<stem>.json``; with --dicom, a DICOM input's ``<stem>_seg.dcm`` and ``<stem>_sr.dcm``, `covidseg_tf.dicom`),
   written with `FileSystems.create` (so ``gs://`` works).
6. **summaries** with Beam's text sink, each as ONE file (`WriteToText` with ``shard_name_template=""``, i.e. one
   shard: fine for summaries, ~1.5 kB per image in ``summary.jsonl``):

   - ``<output>/summary.jsonl``: one JSON record per image (the per-image JSON, on one line);
   - ``<output>/severity.csv``: ``file,severity_left,severity_right,severity_total,grade,infection_probability,
     image_class`` per image (the last two: the image-level head's verdict, empty for models without a head);
   - ``<output>/dead_letter.jsonl``: one ``{"file", "stage", "reason"}`` per input that failed
     (stage: match, read, decode, inference or render).

   Lines are in no particular order (Beam does not keep one); sort them if you need to.

Beam metrics (namespace ``covidseg_batch_predict``): ``images_ok``, ``images_failed`` (and ``failed_<stage>``),
``images_not_assessed`` (processed, but refused by the input quality gate: no severity) and
``patterns_matching_nothing`` (globs that selected no file; also logged), printed at the end with the output files
as one JSON line on stdout. Exit codes (`covidseg_tf.exitcodes`): 0 when every input was processed, 1 when any
failed (dead letters) or nothing matched, 2 when the run was refused before it started (`Refused`: earlier
results without --overwrite, a missing model, an input inside --output; a bad flag value), 130 after Ctrl-C.

Every run also writes ``<output>/manifest.txt``: the files it wrote, one path relative to --output a line.

Reruns: when --output already holds what looks like results of a run (``images/``, ``summary.jsonl``,
``severity.csv``, ``dead_letter.jsonl`` or ``manifest.txt``) the command refuses to start; ``--overwrite``
deletes the files the earlier run's manifest lists, and the manifest, first (so no stale output of the earlier
run stays mixed with the new ones); nothing a run cannot prove it wrote is touched (a user's own files, or those
of a run killed before it wrote its manifest, are kept and named in a warning). A run that processed nothing (every
pattern matched no file) removes the empty summary files it wrote, so the corrected rerun is not refused.

All flags this command does not know are Beam pipeline options (`PipelineOptions`): ``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow's ``--project``/``--region``/``--temp_location``...
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from covidseg_tf.cli import add_decision_flags, add_model_flags, decision_overrides
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL
from covidseg_tf.exitcodes import EPILOG, FAILED, OK, USAGE, interrupted
from covidseg_tf.files import Unusable, path_problem, walk_files
from covidseg_tf.stems import (  # noqa: F401  (the stem rules, shared with serve_client; also bp.<name>)
    GLOB_CHARS,
    SHORT_HASH,
    assign_stems,
    fixed_prefix,
    plan_stems,
    relative_stem,
    resolve_collisions,
    uri_hash,
)

log = logging.getLogger(__name__)

PROG = "python -m covidseg_tf.batch_predict"
NAMESPACE = "covidseg_batch_predict"
"""Namespace of this pipeline's Beam metrics."""
IMAGES_DIR = "images"
SUMMARY = "summary.jsonl"
SEVERITY_CSV = "severity.csv"
DEAD_LETTER = "dead_letter.jsonl"
MANIFEST = "manifest.txt"
"""The files a run wrote, one path relative to --output a line (written by the run itself, after its outputs):
the only files --overwrite deletes."""
CSV_COLUMNS = ("file", "severity_left", "severity_right", "severity_total", "grade", "infection_probability",
               "image_class")
STAGES = ("match", "read", "decode", "inference", "render")
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------- paths and stems
def is_remote(path: str) -> bool:
    """True for a URL such as gs://... or s3://... (a scheme Beam's FileSystems handles), False for local paths."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in GLOB_CHARS)


def normalize_pattern(pattern: str) -> str:
    """A pattern as the pipeline matches it: local paths absolute; a local folder or a pattern ending in ``/``
    becomes ``<folder>/**`` (everything below it)."""
    if not is_remote(pattern):
        trailing = pattern.endswith(("/", os.sep))
        pattern = os.path.abspath(os.path.expanduser(pattern))
        if trailing or (not has_glob(pattern) and os.path.isdir(pattern)):
            return pattern.rstrip("/") + "/**"
        return pattern
    return pattern + "**" if pattern.endswith("/") else pattern


def stem_candidate(element: tuple[str, int], prefixes: Sequence[str]) -> tuple[str, tuple[str, str]]:
    """``(uri, pattern index)`` -> ``(candidate lower-cased, (candidate, uri))`` (`relative_stem`)."""
    uri, index = element
    cand = relative_stem(uri, prefixes[index])
    return cand.lower(), (cand, uri)


def join(root: str, *parts: str) -> str:
    """`FileSystems.join` for URLs and local paths (no doubled ``/`` when `root` ends in one)."""
    return FileSystems.join(root.rstrip("/") if len(root) > 1 else root, *parts)


def output_files(output: str) -> list[str]:
    """What looks like an earlier run's results in `output` (a rerun is refused): everything under images/, the
    three summary files and the manifest. Only the files the manifest lists may be deleted (`manifest_files`)."""
    names = (SUMMARY, SEVERITY_CSV, DEAD_LETTER, MANIFEST)
    patterns = [join(output, IMAGES_DIR, "**")] + [join(output, n) for n in names]
    found: list[str] = []
    for result in FileSystems.match(patterns):
        found.extend(m.path for m in result.metadata_list)
    return sorted(set(found))


def manifest_files(output: str) -> list[str]:
    """The files an earlier run proved it wrote: the entries of ``<output>/manifest.txt`` that still exist (paths
    relative to `output`; an absolute or ``..`` entry is ignored), then the manifest itself; [] without one."""
    manifest = join(output, MANIFEST)
    if not FileSystems.exists(manifest):
        return []
    with FileSystems.open(manifest, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    listed: set[str] = set()
    for rel in (ln.strip() for ln in lines):
        parts = rel.replace("\\", "/").split("/")
        if not rel or rel.startswith("/") or is_remote(rel) or ".." in parts or "" in parts:
            if rel:
                log.warning("%s: ignoring the entry %r (not a path inside --output)", manifest, rel)
            continue
        listed.add(join(output, *parts))
    existing = [m.path for r in FileSystems.match(sorted(listed)) for m in r.metadata_list] if listed else []
    return sorted(set(existing)) + [manifest]


# ----------------------------------------------------------------------------------------------- elements
@dataclass
class XRay:
    """One decoded input on its way through the pipeline."""

    file: str  # the input's URI (local path or URL) as matched
    stem: str  # output path prefix: <output>/images/<stem>
    gray: np.ndarray = field(repr=False)  # H x W uint8
    sha256: str = ""  # of the input's bytes
    colour: float = 0.0  # share of clearly coloured pixels of the file (imageio.decode_image), for the input gate
    dicom: Any = field(default=None, repr=False)  # a DICOM input's header when its SEG and SR are wanted (--dicom)


@dataclass
class InferenceFailure:
    """Stands in for a Prediction when the cascade raised on this image."""

    reason: str


def dead_letter(file: str, stage: str, reason: str) -> str:
    return json.dumps({"file": file, "stage": stage, "reason": reason})


def _failed(stage: str) -> None:
    Metrics.counter(NAMESPACE, "images_failed").inc()
    Metrics.counter(NAMESPACE, f"failed_{stage}").inc()


def _may_hold_matches(rel_parts: Sequence[str], segments: Sequence[str]) -> bool:
    """Whether a folder at `rel_parts` below a pattern's listing root could hold files the rest of the pattern
    (`segments`, split at ``/``) matches: a ``**`` on the way reaches anything, other segments must match."""
    for i, part in enumerate(rel_parts):
        if "**" in segments[min(i, len(segments) - 1)]:
            return True
        if i >= len(segments) - 1 or not re.match(LocalFileSystem.translate_pattern(segments[i]), part):
            return False
    return True


def local_unusable(pattern: str) -> list[Unusable]:
    """What Beam's local match skips without a word although `pattern` (absolute, local) names or could reach it
    (`covidseg_tf.files.walk_files`): dangling or looping symbolic links and non-regular files the pattern matches
    (a FIFO would block its reader forever), folders below the listing root that cannot be listed, and, as notes,
    symbolic links to folders (not followed, as Beam's os.walk does not). A literal path: its `path_problem`."""
    if not has_glob(pattern):
        problem = path_problem(pattern)
        return [Unusable(Path(pattern), problem)] if problem else []
    root = fixed_prefix(pattern).rstrip("/") or "/"
    problem = path_problem(root)
    if problem is not None:
        return [Unusable(Path(root), problem)]
    if not os.path.isdir(root):
        return []
    regex = re.compile(LocalFileSystem.translate_pattern(pattern))
    segments = pattern[len(root):].lstrip("/").split("/")
    _, unusable = walk_files(root)
    found = []
    for u in unusable:
        path = str(u.path)
        rel = [] if path == root else path[len(root):].lstrip("/").split("/")
        folder = os.path.isdir(path)  # a folder that cannot be listed, or a link to one
        if (folder and _may_hold_matches(rel, segments)) or (not folder and regex.match(path)):
            found.append(u)
    return found


class MatchFn(beam.DoFn):
    """``(pattern index, pattern)`` -> ``(uri, pattern index)`` for each matched file (`FileSystems.match`, as
    `fileio.MatchFiles` does); files under `exclude` (the output location) are skipped; a literal pattern that
    matches nothing goes to the dead letter, and so does what a local pattern reaches but cannot use
    (`local_unusable`: a folder that cannot be listed, a dangling or looping link, a FIFO...)."""

    def __init__(self, exclude: str):
        self.exclude = exclude.rstrip("/") + "/"

    def process(self, element: tuple[int, str]) -> Iterator[Any]:
        index, pattern = element
        unusable = set()
        if not is_remote(pattern):
            for u in local_unusable(pattern):
                if (str(u.path) + "/").startswith(self.exclude):
                    continue
                unusable.add(str(u.path))
                if not u.error:
                    log.warning("%s: %s", u.path, u.reason)
                    continue
                _failed("match")
                yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(str(u.path), "match", u.reason))
            if not has_glob(pattern) and unusable:
                return
        try:
            matched = [m for m in FileSystems.match([pattern])[0].metadata_list if m.path not in unusable]
        except Exception as e:  # e.g. a bucket that does not exist: the other patterns go on
            _failed("match")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(pattern, "match", f"{type(e).__name__}: {e}"))
            return
        if not matched and unusable:
            return  # said above
        if not matched and has_glob(pattern):  # allowed (a glob may select nothing), but said and counted
            log.warning("pattern %s matches no file", pattern)
            Metrics.counter(NAMESPACE, "patterns_matching_nothing").inc()
            return
        if not matched:
            _failed("match")
            hint = " (for everything below a prefix give a pattern such as PREFIX/**)" if is_remote(pattern) else ""
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(pattern, "match", "no such file" + hint))
            return
        for m in matched:
            if m.path.endswith(("/", "\\")):
                continue
            if m.path.startswith(self.exclude):
                Metrics.counter(NAMESPACE, "skipped_in_output").inc()
                continue
            yield m.path, index


class ReadDecodeFn(beam.DoFn):
    """``(uri, stem)`` -> `XRay` (bytes through `fileio.ReadableFile`, then `imageio.decode_image`: the grey image
    and the file's colour share); failures go to the ``dead_letter`` output with the reason."""

    def __init__(self, images_root: str, dicom: bool = False):
        self.images_root = images_root
        self.dicom = dicom  # keep a DICOM input's header (`imageio.DecodedImage.dicom`) for its SEG and SR

    def process(self, element: tuple[str, str]) -> Iterator[Any]:
        from covidseg_tf.imageio import decode_image

        uri, stem = element
        try:
            data = fileio.ReadableFile(FileMetadata(uri, 0)).read()
        except Exception as e:
            _failed("read")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(uri, "read", f"{type(e).__name__}: {e}"))
            return
        if not data:
            _failed("decode")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(uri, "decode", f"{uri}: empty file (0 bytes)"))
            return
        try:
            decoded = decode_image(data, uri)
        except Exception as e:  # XRayReadError, or anything else the decoders raise
            _failed("decode")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(uri, "decode", str(e)))
            return
        yield XRay(file=uri, stem=join(self.images_root, stem), gray=decoded.gray,
                   sha256=hashlib.sha256(data).hexdigest(), colour=decoded.colour,
                   dicom=decoded.dicom if self.dicom else None)


# ----------------------------------------------------------------------------------------------- the model
def stage_locally(path: str) -> str:
    """A model path the cascade can load: local paths as they are; a remote `.keras` file or SavedModel folder
    (any FileSystems URL) copied into a new local temporary folder (same last name, same layout)."""
    if not is_remote(path):
        return path
    src = path.rstrip("/")
    dest_root = tempfile.mkdtemp(prefix="covidseg-model-")
    dest = os.path.join(dest_root, posixpath.basename(src))
    files = [m.path for m in FileSystems.match([src + "/**"])[0].metadata_list] or [src]  # a folder, or a .keras
    base = posixpath.dirname(src) + "/"
    for f in files:
        target = os.path.join(dest_root, *f[len(base):].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(f, compression_type=CompressionTypes.UNCOMPRESSED) as r, open(target, "wb") as w:
            while chunk := r.read(1 << 24):
                w.write(chunk)
    log.info("copied model %s (%d files) to %s", path, len(files), dest)
    return dest


@dataclass
class LoadedCascade:
    """What `CascadeModelHandler.load_model` gives each worker: the cascade and its `predict.model_info`."""

    cascade: Any
    models: dict[str, Any]


class CascadeModelHandler(ModelHandler):
    """RunInference's handler for the two-stage cascade: examples are `XRay`s, results ``(XRay, Prediction or
    InferenceFailure, models info)`` triples.

    Args:
        lung_model, infection_model: paths or URLs of the stage models (`covidseg_tf.inference.load_stage`).
        decision: `Decision` fields that replace the models' recorded decision (`Predictor.load`'s overrides, as
            predict's --threshold ... flags); image_size: for models without a fixed input size.
        max_batch_size: images per `Predictor.predict` call (BatchElements' upper bound; it starts at 1 and grows
            while larger batches are faster per image). Images of any size share a batch: the cascade resizes
            each to the model size and returns masks at each input's own size. oneDNN's results depend on the
            batch size (and the thread count) in the last bits, so a pixel at the threshold may differ from
            `predict` (one image per call); max_batch_size=1 with predict's thread count reproduces it exactly.
        tf_threads: TensorFlow intra-op threads per worker process (None: TensorFlow's default, all cores);
            useful when several worker processes share one machine.
    """

    def __init__(self, lung_model: str, infection_model: str, decision: dict[str, Any] | None = None,
                 image_size: int | None = None, max_batch_size: int = DEFAULT_BATCH_SIZE,
                 tf_threads: int | None = None):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self.lung_model, self.infection_model = str(lung_model), str(infection_model)
        self.decision, self.image_size, self.tf_threads = dict(decision or {}), image_size, tf_threads

    def load_model(self) -> LoadedCascade:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if self.tf_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError as e:  # TensorFlow already running in this process (e.g. the in-process runner)
                log.warning("--tf-threads %s not applied: %s", self.tf_threads, e)
        from covidseg_tf.inference import Predictor
        from covidseg_tf.predict import model_info

        given = {"lung": self.lung_model, "infection": self.infection_model}
        local = {k: stage_locally(v) for k, v in given.items()}
        cascade = Predictor.load(local["lung"], local["infection"], image_size=self.image_size, **self.decision)
        models = model_info(cascade)
        for k in given:  # report the models by the paths the user gave, not the temporary copies
            if local[k] != given[k]:
                models[k]["path"] = models[k]["path"].replace(os.path.dirname(local[k]),
                                                              posixpath.dirname(given[k].rstrip("/")), 1)
        return LoadedCascade(cascade, models)

    def run_inference(self, batch: Sequence[XRay], model: LoadedCascade,
                      inference_args: dict[str, Any] | None = None) -> Iterable[tuple[XRay, Any, dict[str, Any]]]:
        try:
            preds: list[Any] = model.cascade.predict([x.gray for x in batch], colour=[x.colour for x in batch])
        except Exception as e:
            if len(batch) == 1:
                preds = [InferenceFailure(f"{type(e).__name__}: {e}")]
            else:  # find the image(s) that fail; the others keep their predictions
                log.warning("a batch of %d failed (%s: %s); retrying its images one by one", len(batch),
                            type(e).__name__, e)
                preds = [next(iter(self.run_inference([x], model)))[1] for x in batch]
        return [(x, p, model.models) for x, p in zip(batch, preds)]

    def get_num_bytes(self, batch: Sequence[XRay]) -> int:
        return sum(x.gray.nbytes for x in batch)  # the default pickles the whole batch to measure it

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_RunInference"


# ----------------------------------------------------------------------------------------------- outputs
def csv_line(record: dict[str, Any]) -> str:
    """One `severity.csv` row (CSV_COLUMNS); an image the input quality gate did not assess (``"assessed":
    false`` in its record) has empty severities and the grade ``not assessed``; the image-level head's columns
    are empty for models without a head."""
    buf = io.StringIO()
    sev = record["severity"]
    grade = sev["grade"] if record.get("assessed", True) else "not assessed"
    head = record.get("image_level") or {}
    csv.writer(buf, lineterminator="").writerow([record["file"], sev["left"], sev["right"], sev["total"], grade,
                                                head.get("infection_probability"), head.get("class")])
    return buf.getvalue()


class WriteOutputsFn(beam.DoFn):
    """``(XRay, Prediction or InferenceFailure, models)`` -> `predict`'s four files per image (written with
    `FileSystems.create`); yields the JSON record, failures go to ``dead_letter``."""

    def __init__(self, output: str = ""):
        self.output = output.rstrip("/") + "/" if output else ""

    def process(self, element: tuple[XRay, Any, dict[str, Any]]) -> Iterator[Any]:
        from covidseg_tf.predict import render_outputs

        x, pred, models = element
        if isinstance(pred, InferenceFailure):
            _failed("inference")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(x.file, "inference", pred.reason))
            return
        try:
            record, encoded = render_outputs(x.file, x.gray, pred, x.stem, models, sha256=x.sha256, dicom=x.dicom)
        except Exception as e:
            _failed("render")
            yield beam.pvalue.TaggedOutput("dead_letter", dead_letter(x.file, "render", f"{type(e).__name__}: {e}"))
            return
        for path, data in encoded.items():  # an unwritable output is the run's problem, not the image's: raise
            mime = ("application/json" if path.endswith(".json") else "application/dicom" if path.endswith(".dcm")
                    else "image/png")
            if self.output and path.startswith(self.output):  # for the manifest, before the file exists
                yield beam.pvalue.TaggedOutput("written", path[len(self.output):])
            with FileSystems.create(path, mime_type=mime, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                f.write(data)
        Metrics.counter(NAMESPACE, "images_ok").inc()
        if record.get("assessed") is False:  # processed, but refused by the input quality gate: no severity
            Metrics.counter(NAMESPACE, "images_not_assessed").inc()
        yield record


@dataclass
class Settings:
    """Everything `build_pipeline` needs besides the Beam pipeline."""

    patterns: list[str]
    output: str
    lung_model: str = str(DEFAULT_LUNG_MODEL)
    infection_model: str = str(DEFAULT_INFECTION_MODEL)
    decision: dict[str, Any] = field(default_factory=dict)  # Decision fields replacing the models' recorded ones
    image_size: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    tf_threads: int | None = None
    dicom: bool = False  # also a DICOM Segmentation and Measurement Report per DICOM input


def build_pipeline(p: beam.Pipeline, s: Settings) -> None:
    """Add the whole job (module docstring) to `p`; `s.patterns` already normalized (`normalize_pattern`)."""
    prefixes = [fixed_prefix(pat) for pat in s.patterns]
    matched = (p | "Patterns" >> beam.Create(list(enumerate(s.patterns)))
               | "Match" >> beam.ParDo(MatchFn(s.output)).with_outputs("dead_letter", main="files"))
    stems = (matched.files
             | "OnePatternPerFile" >> beam.CombinePerKey(min)
             | "StemCandidate" >> beam.Map(stem_candidate, prefixes)
             | "GroupCandidates" >> beam.GroupByKey()
             | "AssignStems" >> beam.FlatMap(lambda kv: assign_stems(*kv))
             | "GroupStems" >> beam.GroupByKey()
             | "ResolveCollisions" >> beam.FlatMap(lambda kv: resolve_collisions(*kv)))
    decoded = stems | "ReadDecode" >> beam.ParDo(ReadDecodeFn(join(s.output, IMAGES_DIR), s.dicom)).with_outputs(
        "dead_letter", main="images")
    handler = CascadeModelHandler(s.lung_model, s.infection_model, s.decision, s.image_size, s.batch_size,
                                  s.tf_threads)
    written = (decoded.images
               | "RunInference" >> RunInference(handler)
               | "WriteOutputs" >> beam.ParDo(WriteOutputsFn(s.output)).with_outputs("dead_letter", "written",
                                                                                      main="records"))
    records = written.records
    (records | "SummaryLines" >> beam.Map(json.dumps)
     | "WriteSummary" >> beam.io.WriteToText(join(s.output, SUMMARY), shard_name_template=""))
    (records | "CsvLines" >> beam.Map(csv_line)
     | "WriteSeverityCsv" >> beam.io.WriteToText(join(s.output, SEVERITY_CSV), shard_name_template="",
                                                 header=",".join(CSV_COLUMNS)))
    ((matched.dead_letter, decoded.dead_letter, written.dead_letter) | "DeadLetters" >> beam.Flatten()
     | "WriteDeadLetter" >> beam.io.WriteToText(join(s.output, DEAD_LETTER), shard_name_template=""))
    ((written.written, p | "SummaryNames" >> beam.Create([SUMMARY, SEVERITY_CSV, DEAD_LETTER]))
     | "Written" >> beam.Flatten()
     | "WriteManifest" >> beam.io.WriteToText(join(s.output, MANIFEST), shard_name_template=""))


# ----------------------------------------------------------------------------------------------- the command
@dataclass
class RunResult:
    """What `run` reports: counts from the Beam metrics (None where the runner gives none) and the output files."""

    images_ok: int | None
    images_failed: int | None
    images_not_assessed: int | None  # among images_ok: refused by the input quality gate (no severity)
    patterns_matching_nothing: int | None  # globs that selected no file (literal paths are dead letters instead)
    failed_by_stage: dict[str, int]
    output: str
    files: dict[str, str]
    state: str
    seconds: float
    run_inference: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def counters(result: Any) -> dict[str, int] | None:
    """This pipeline's counters from `result.metrics()` (committed values, attempted where a runner has none);
    None when the runner reports no metrics."""
    out: dict[str, int] = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, KeyError) as e:
        log.warning("the runner gives no metrics: %s", e)
        return None
    for m in found:
        try:
            value = m.committed
        except Exception:  # some runners support attempted values only
            value = None
        value = m.attempted if value is None else value
        out[m.key.metric.name] = out.get(m.key.metric.name, 0) + int(value or 0)
    return out


def inference_metrics(result: Any) -> dict[str, float]:
    """RunInference's own metrics, summed over worker processes: batches, images, mean batch size, seconds in
    `run_inference` (`inference_s`, all processes together) and in `load_model` (`model_load_s`, `model_loads`)."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(f"{NAMESPACE}_RunInference"))
    except (NotImplementedError, AttributeError) as e:
        log.debug("no RunInference metrics: %s", e)
        return {}

    def value(m: Any) -> Any:
        try:
            return m.committed if m.committed is not None else m.attempted
        except Exception:
            return m.attempted

    dist = {m.key.metric.name: value(m) for m in found.get("distributions", []) if value(m) is not None}
    out: dict[str, float] = {}
    if "inference_batch_latency_micro_secs" in dist:
        d = dist["inference_batch_latency_micro_secs"]
        out.update(batches=d.count, inference_s=round(d.sum / 1e6, 2))
    if "inference_request_batch_size" in dist:
        d = dist["inference_request_batch_size"]
        out.update(images=d.sum, mean_batch=round(d.sum / max(d.count, 1), 2))
    if "load_model_latency_milli_secs" in dist:
        d = dist["load_model_latency_milli_secs"]
        out.update(model_loads=d.count, model_load_s=round(d.sum / 1e3, 2))
    return out


class Refused(Exception):
    """The run was not started (existing results without --overwrite, missing model...)."""


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuse when `output` holds what looks like an earlier run's results, unless `overwrite`: then delete the
    files the earlier run's manifest lists (`manifest_files`), and nothing else."""
    if not is_remote(output) and os.path.exists(output) and not os.path.isdir(output):
        raise Refused(f"--output {output} exists and is not a folder")
    existing = output_files(output)
    if not existing:
        return
    if not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise Refused(f"--output {output} already holds the results of a run ({len(existing)} files: {shown}); "
                      "choose another --output, or pass --overwrite to delete them and run again")
    owned = manifest_files(output)
    log.warning("--overwrite: deleting %d files an earlier run wrote in %s (listed in its %s)", len(owned),
                output, MANIFEST)
    for i in range(0, len(owned), 1000):
        FileSystems.delete(owned[i:i + 1000])
    kept = len(set(existing) - set(owned))
    if kept:
        log.warning("--overwrite: %d file(s) in %s no run's %s lists are kept (not deleted): %s", kept, output,
                    MANIFEST, ", ".join(sorted(set(existing) - set(owned))[:3]))


def remove_empty_run(output: str, remove_folder: bool = False) -> bool:
    """After a run that processed nothing (no summary line, no dead letter): delete the empty files it wrote, so
    the corrected rerun is not refused. True when it did."""
    names = (SUMMARY, DEAD_LETTER, SEVERITY_CSV, MANIFEST)
    paths = [join(output, n) for n in names]
    try:
        for path in paths[:2]:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                if f.read(1):
                    return False
        with FileSystems.open(paths[2], compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if len(f.read().splitlines()) > 1:  # more than the header
                return False
    except Exception as e:  # a runner that did not write them: nothing to remove
        log.debug("no empty run to remove in %s: %s", output, e)
        return False
    FileSystems.delete([p for p in paths if FileSystems.exists(p)])
    if remove_folder and not is_remote(output):
        with contextlib.suppress(OSError):
            os.rmdir(output)  # only when empty (created by this run)
    return True


def check_model(path: str, flag: str) -> None:
    if is_remote(path):  # a file, or a "folder" (prefix) holding at least one file
        src = path.rstrip("/")
        exists = FileSystems.exists(src) or bool(FileSystems.match([src + "/**"], limits=[1])[0].metadata_list)
    else:
        exists = os.path.exists(path)
    if not exists:
        raise Refused(f"{flag} {path} not found (on Dataflow and other remote runners give a path every worker "
                      "can read, e.g. gs://bucket/models/lung/1)")


def run(settings: Settings, beam_args: Sequence[str] = (), overwrite: bool = False) -> RunResult:
    """Check the output and models, run the pipeline to the end and return its counts (raises `Refused`)."""
    settings.patterns = [normalize_pattern(p) for p in settings.patterns]
    if not is_remote(settings.output):
        settings.output = os.path.abspath(os.path.expanduser(settings.output))
    for pat in settings.patterns:  # (the output inside an input folder is fine: its files are not inputs)
        if fixed_prefix(pat).startswith(settings.output.rstrip("/") + "/"):
            raise Refused(f"input {pat} lies inside --output {settings.output}: outputs and inputs would mix")
    check_model(settings.lung_model, "--lung-model")
    check_model(settings.infection_model, "--infection-model")
    prepare_output(settings.output, overwrite)
    created = not is_remote(settings.output) and not os.path.exists(settings.output)
    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if runner not in ("DirectRunner", "FnApiRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner") and any(
            not is_remote(m) for m in (settings.lung_model, settings.infection_model)):
        log.warning("--runner %s with local model paths: every worker must see %s and %s (put the models on "
                    "gs:// or into the worker container)", runner, settings.lung_model, settings.infection_model)
    t0 = time.perf_counter()
    p = beam.Pipeline(options=options)
    build_pipeline(p, settings)
    result = p.run()
    state = result.wait_until_finish()
    if remove_empty_run(settings.output, remove_folder=created):
        log.warning("nothing was processed: no output written to %s", settings.output)
    seconds = time.perf_counter() - t0
    c = counters(result)
    files = {"summary": join(settings.output, SUMMARY), "severity_csv": join(settings.output, SEVERITY_CSV),
             "dead_letter": join(settings.output, DEAD_LETTER), "images": join(settings.output, IMAGES_DIR)}
    return RunResult(images_ok=None if c is None else c.get("images_ok", 0),
                     images_failed=None if c is None else c.get("images_failed", 0),
                     images_not_assessed=None if c is None else c.get("images_not_assessed", 0),
                     patterns_matching_nothing=None if c is None else c.get("patterns_matching_nothing", 0),
                     failed_by_stage={s: c[f"failed_{s}"] for s in STAGES if (c or {}).get(f"failed_{s}")},
                     output=settings.output, files=files, state=str(state), seconds=round(seconds, 2),
                     run_inference=inference_metrics(result))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="predict's masks, overlays and severity for whole archives of X-rays, as an Apache Beam "
                    "pipeline (RunInference); writes <output>/images/<stem>_{lung,infection,overlay}.png + .json, "
                    "summary.jsonl, severity.csv and dead_letter.jsonl. Flags not listed here are Beam pipeline "
                    "options (--runner, --direct_num_workers, --direct_running_mode, Dataflow's --project ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # this machine, the shipped models, two worker processes\n"
               "  python -m covidseg_tf.batch_predict 'scans/**' --output preds \\\n"
               "      --runner DirectRunner --direct_num_workers 2 --direct_running_mode multi_processing\n"
               "  # only some files, two patterns, your own models\n"
               "  python -m covidseg_tf.batch_predict 'scans/2020/*.png' 'scans/dicom/**.dcm' --output preds \\\n"
               "      --lung-model runs/lung/model.keras --infection-model runs/infection/model.keras\n"
               "  # Google Cloud Dataflow (models and data on GCS; pip install 'apache-beam[gcp]')\n"
               "  python -m covidseg_tf.batch_predict 'gs://archive/xrays/**' --output gs://results/run1 \\\n"
               "      --lung-model gs://models/lung/1 --infection-model gs://models/infection/1 \\\n"
               "      --runner DataflowRunner --project P --region europe-west1 \\\n"
               "      --temp_location gs://results/tmp --sdk_container_image IMAGE   # or --requirements_file ...\n"
               "patterns: * stays in one folder, ** crosses folders; a local folder or a pattern ending in / "
               "means everything below it.\n"
               "dead letters (exit 1, the others processed): missing literal paths, unreadable, empty, corrupt or "
               "non-image files,\nimages above 4096 px a side, dangling or looping links, FIFOs, folders that "
               "cannot be listed;\nrefused (exit 2, nothing run): earlier results in --output without "
               "--overwrite, a missing model, an input\ninside --output, --output that is a file, a bad flag "
               "value.\n" + EPILOG)
    p.add_argument("inputs", nargs="+", help="file patterns or paths: local, gs://, s3:// (quote globs)")
    p.add_argument("--output", required=True, help="output location (local folder, gs://..., s3://...)")
    add_model_flags(p, urls=True)
    add_decision_flags(p)  # --threshold, --infection-threshold, --min-infection-percent, --hflip, as predict
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="most images per cascade call (RunInference batches grow from 1 up to this; 1 gives "
                        "exactly predict's masks, larger batches may flip a pixel at the threshold; "
                        "default: %(default)s)")
    p.add_argument("--tf-threads", type=int, default=None,
                   help="TensorFlow intra-op threads per worker process (default: TensorFlow's, all cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="if --output holds an earlier run's results, delete them and run (default: refuse)")
    p.add_argument("--dicom", action="store_true",
                   help="for each DICOM input, also write <stem>_seg.dcm (DICOM Segmentation) and <stem>_sr.dcm (TID "
                   "1500 Measurement Report); an input they cannot be made for goes to the dead letter (stage render)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # Beam 2.77's RunInference warns at every model load that it cannot measure memory when torch is absent
    # (its `resource` import shares a try block with a torch-only module): harmless, and not our memory
    logging.getLogger().addFilter(lambda r: not r.getMessage().startswith("Resource module is not available"))
    decision = decision_overrides(args)
    try:  # checked here, before any worker starts
        from covidseg_tf.inference import Decision

        dataclasses.replace(Decision(), **decision)
    except (TypeError, ValueError) as e:
        log.error("%s", e)
        return USAGE
    if args.batch_size < 1:
        log.error("--batch-size must be >= 1, got %s", args.batch_size)
        return USAGE
    settings = Settings(patterns=list(args.inputs), output=args.output, lung_model=args.lung_model,
                        infection_model=args.infection_model, decision=decision, image_size=args.image_size,
                        batch_size=args.batch_size, tf_threads=args.tf_threads, dicom=args.dicom)
    try:
        res = run(settings, beam_args, overwrite=args.overwrite)
    except Refused as e:
        log.error("%s", e)
        return USAGE
    except KeyboardInterrupt:
        return interrupted(PROG, f"the run did not finish (no summaries, no manifest in {settings.output}); rerun "
                                 "with --overwrite, which writes over its image outputs")
    print(json.dumps(res.as_dict()), flush=True)
    if res.patterns_matching_nothing:
        log.warning("%d pattern(s) matched no file", res.patterns_matching_nothing)
    if res.images_ok is not None:
        log.info("%d image(s) processed, %d failed (%s) into %s", res.images_ok, res.images_failed,
                 res.failed_by_stage or "none", res.output)
    if res.images_failed:
        log.error("%d input(s) failed: see %s", res.images_failed, res.files["dead_letter"])
        return FAILED
    if res.images_ok == 0:
        log.error("no input matched %s", " ".join(settings.patterns))
        return FAILED
    return OK


if __name__ == "__main__":
    # Run the module under its own name, so the DoFns pickled for the workers refer to covidseg_tf.batch_predict
    # (importable on every worker), not to __main__.
    from covidseg_tf.batch_predict import PROG as _PROG
    from covidseg_tf.batch_predict import main as _main

    try:
        sys.exit(_main())
    except KeyboardInterrupt:  # before the pipeline ran (e.g. while Beam imports)
        sys.exit(interrupted(_PROG))
