"""DICOM outputs of one prediction on a DICOM X-ray: a Segmentation (SEG) and a TID 1500 Measurement Report (SR).

`write_seg_and_sr(source, masks, severity, algorithm, out_dir)` writes, beside predict's PNG and JSON outputs,

    <stem>_seg.dcm  a DICOM Segmentation (highdicom.seg.Segmentation, BINARY), one frame per segment at the source's
                    Rows x Columns, in the source's pixel grid (no resampling, no flip):
                    1 "Right lung", 2 "Left lung" (the PATIENT's sides, split as `postprocess.severity` splits
                    them: `postprocess.split_columns`), 3 "Infection" (abnormal opacity inside the lungs)
    <stem>_sr.dcm   a Comprehensive 3D SR holding a TID 1500 Measurement Report: one TID 1410 group per segment
                    (each referencing its SEG segment), with the infected share of that lung (groups 1-2) and of both
                    lungs (group 3, with the grade), and one TID 1501 group for the whole image saying whether the
                    input gate assessed it (and, if not, why)

both in the source's study (its Study Instance UID, patient and study attributes, Frame of Reference UID when it has
one), each in a new series with new UIDs, referencing the source's SOP Instance (and its series), identifying the
algorithm (name, version, the model files' SHA-256) and saying "NOT FOR CLINICAL USE" in the Series Description.

Example (what predict does for a DICOM input)::

    import io
    from pathlib import Path

    import pydicom

    from covidseg_tf.dicom import Algorithm, write_seg_and_sr
    from covidseg_tf.imageio import decode_image
    from covidseg_tf.inference import Predictor
    from covidseg_tf.predict import model_info, render_outputs

    data = Path("chest.dcm").read_bytes()
    image = decode_image(data, "chest.dcm")              # grey pixels, MONOCHROME1 inverted, at Rows x Columns
    predictor = Predictor.load("saved_models/lung", "saved_models/infection")
    pred = predictor.predict([image.gray], colour=[image.colour])[0]
    models = model_info(predictor)
    record, _ = render_outputs("chest.dcm", image.gray, pred, "out/chest", models)   # predict's JSON record
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)   # its header is enough
    seg_path, sr_path = write_seg_and_sr(
        source, {"lung": pred.lung, "infection": pred.infection}, record, Algorithm.from_models(models), "out",
        stem="chest", name="chest.dcm")                                    # out/chest_seg.dcm, out/chest_sr.dcm

Inputs
    `masks`: {"lung": H x W, "infection": H x W} arrays at the source's Rows x Columns (nonzero = in the mask), as
    `inference.Prediction` gives them for the decoded source (`imageio.decode_image` keeps the DICOM's pixel grid:
    MONOCHROME1, rescale and windowing change grey values, never positions). `severity`: predict's JSON record (or
    any mapping with its keys): ``assessed``, ``reason`` and ``severity`` = {``left``, ``right``, ``total``,
    ``grade``} (percent of lung area; the patient's sides).

Sides
    `postprocess.severity` takes the image's left columns as the patient's right lung (a PA/AP view shown the usual
    way). When the source says otherwise in Patient Orientation (its first value, the direction of increasing
    column index, starting with "R": a mirrored image), the segments and the SR name the sides the other way round
    (the image-left lung is then the patient's left) and the per-lung numbers go with them; a warning is logged.

Geometry (chest X-rays: CR / DX)
    The SEG is the source's pixel grid: each of its frames references the source image it was derived from
    (Derivation Image Sequence), which is how viewers place a SEG on a projection image. Frame of Reference UID:
    copied when the source has one; CR and DX images often have none (the module is optional there), and then the
    SEG has none either (highdicom allows this for a single-frame source). Pixel spacing: an X-ray has no patient
    coordinate system (no Image Orientation / Position (Patient)), so the SEG has no Pixel Measures (which would
    need one, and with a Frame of Reference a slice thickness); the spacing stays in the source. The SR's Image
    Library entry for the source (TID 1603) records its Patient Orientation, Imager Pixel Spacing (at the detector)
    and Frame of Reference UID; a source without Patient Orientation or Imager Pixel Spacing (optional, or empty, in
    CR) gets an SR without the Image Library (a warning is logged); its measurement groups and evidence still
    reference the source. The SR's numbers are ratios of pixel counts: they need no spacing.

Not assessed
    An image the input gate refused (``assessed`` false) gets the SEG (its three segments empty, as predict's mask
    PNGs are) and an SR with only the image-level group: "Assessed: No" and the reason as text; no per-lung
    numbers and no grade.

Codes: standard ones (SNOMED CT, DICOM, UCUM) where one means exactly what is measured; the infected share of a
lung, which has none, and the gate's verdict use the local coding scheme `CODING_SCHEME` (declared in the SR's
Coding Scheme Identification Sequence).

Errors: `DicomWriteError`, naming the source (`name`, else its file name) and the attribute, mask or figure that is
missing or wrong; nothing is written then. Patient and study attributes a SEG / SR carries but a (de-identified)
source may lack (`TYPE2_SOURCE_ATTRIBUTES`: Type 2, empty when unknown) are written empty instead.

Files are written under temporary names and renamed (`files.replace_atomically`), the SEG first, the SR (which
references it) last.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidseg_tf import __version__
from covidseg_tf.files import partial_path, replace_atomically

if TYPE_CHECKING:
    import highdicom as hd
    import pydicom

log = logging.getLogger(__name__)

ALGORITHM_NAME = "covidseg-tf"
SEG_SUFFIX, SR_SUFFIX = "_seg.dcm", "_sr.dcm"
DICOM_SUFFIXES = (SEG_SUFFIX, SR_SUFFIX)
"""The output file names' endings (after the stem), in the order they are written."""
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9901, 9902
SERIES_DESCRIPTION = "covidseg-tf {what} - NOT FOR CLINICAL USE"
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                              "Rows", "Columns")
"""Attributes a source dataset must have (the references and the pixel grid); a missing one is an error."""
TYPE2_SOURCE_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "StudyID", "AccessionNumber", "ReferringPhysicianName")
"""Patient / study attributes copied from the source into the SEG and SR; one the source lacks is written empty
(`with_type2_attributes`)."""
RIGHT_LUNG, LEFT_LUNG, INFECTION = 1, 2, 3
"""Segment numbers (the SEG's frame numbers too: one frame per segment)."""

CODING_SCHEME = "99COVIDSEG"
"""The local coding scheme of the concepts no standard code names exactly (declared in the SR)."""


@functools.cache
def concepts() -> dict[str, Any]:
    """The coded concepts of the SEG and SR by role ("infected_share", "assessed", "reason", "right_lung",
    "grades": {grade: concept}, ...), built once on first use (highdicom is imported lazily)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    local = {"infected_share": ("INFSHARE", "Infected share of lung area"),
             "assessed": ("ASSESSED", "Assessed by the input gate"),
             "reason": ("NOTASSESSEDWHY", "Reason not assessed")}
    out = {k: CodedConcept(v, CODING_SCHEME, meaning) for k, (v, meaning) in local.items()}
    out.update(
        right_lung=CodedConcept("3341006", "SCT", "Right lung"),
        left_lung=CodedConcept("44029006", "SCT", "Left lung"),
        lung=codes.SCT.Lung,
        opacity=codes.DCM.AbnormalOpacity,
        anatomy=codes.SCT.AnatomicalStructure,
        abnormal=codes.SCT.MorphologicallyAbnormalStructure,
        severity=codes.SCT.Severity,
        grades={"none": codes.SCT.None_, "mild": codes.SCT.Mild, "moderate": codes.SCT.Moderate,
                "severe": codes.SCT.Severe},
        yes=codes.SCT.Yes, no=codes.SCT.No,
        percent=codes.UCUM.Percent,
        procedure=codes.SCT.ChestImaging,
        family=codes.cid7162.ArtificialIntelligence,
    )
    return out


class DicomWriteError(ValueError):
    """The SEG / SR cannot be made from these inputs; the message names the source and what is missing or wrong."""


@dataclass(frozen=True)
class Algorithm:
    """Which algorithm made the masks: `name`, `version` (covidseg-tf's) and {stage: SHA-256 hex} of the model files
    (`predict.model_file_info`'s ``sha256``). `Algorithm.from_models(predict.model_info(predictor))` builds it."""

    version: str = __version__
    model_sha256: Mapping[str, str] = field(default_factory=dict)
    name: str = ALGORITHM_NAME

    @classmethod
    def from_models(cls, models: Mapping[str, Any]) -> Algorithm:
        """From predict's ``models`` record ({"lung": {"sha256": ...}, "infection": {...}, "covidseg_tf": ...})."""
        return cls(version=str(models.get("covidseg_tf", __version__)),
                   model_sha256={k: str(models[k]["sha256"]) for k in ("lung", "infection") if k in models})

    def parameters(self) -> dict[str, str]:
        """{"<stage> model sha256": hex} (the Algorithm Parameters of the SEG and SR)."""
        return {f"{stage} model sha256": digest for stage, digest in sorted(self.model_sha256.items())}

    def for_seg(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG's Segment Algorithm Identification."""
        import highdicom as hd

        return hd.AlgorithmIdentificationSequence(name=self.name, family=concepts()["family"], version=self.version,
                                                  parameters=self.parameters() or None)

    def for_sr(self) -> hd.sr.AlgorithmIdentification:
        """The SR's TID 4019 Algorithm Identification."""
        import highdicom as hd

        params = [f"{k}={v}" for k, v in self.parameters().items()]
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version, parameters=params or None)


# ----------------------------------------------------------------------------------------------- checks of the inputs
def _source_name(source: pydicom.Dataset, name: str | None = None) -> str:
    """`name` if given, else the source's file name, else "source DICOM dataset" (for messages)."""
    if name:
        return name
    filename = getattr(source, "filename", None)
    return str(filename) if isinstance(filename, (str, Path)) and str(filename) else "source DICOM dataset"


def check_source(source: pydicom.Dataset, name: str | None = None) -> None:
    """Raise `DicomWriteError` naming the first of `REQUIRED_SOURCE_ATTRIBUTES` the source lacks (or has empty), or
    a multi-frame source (a chest X-ray is one frame; predict decodes the first only). `name` names the source in
    the message (default: its file name)."""
    name = _source_name(source, name)
    for keyword in REQUIRED_SOURCE_ATTRIBUTES:
        if keyword not in source or source[keyword].value in (None, ""):
            raise DicomWriteError(f"{name}: the source has no {keyword}; a DICOM SEG / SR must reference it")
    frames = int(source.get("NumberOfFrames") or 1)
    if frames != 1:
        raise DicomWriteError(f"{name}: the source has {frames} frames (NumberOfFrames); one X-ray frame expected")


def with_type2_attributes(source: pydicom.Dataset, name: str | None = None) -> pydicom.Dataset:
    """The source itself, or, when it lacks some of `TYPE2_SOURCE_ATTRIBUTES` (patient and study attributes a SEG /
    SR must carry, empty when unknown; de-identified files often drop them), a new dataset with the same elements
    and those added empty (logged); the caller's dataset is never changed."""
    import pydicom

    missing = [k for k in TYPE2_SOURCE_ATTRIBUTES if k not in source]
    if not missing:
        return source
    log.info("%s: no %s: written empty in the SEG and SR (Type 2: unknown)", _source_name(source, name),
             ", ".join(missing))
    filled = pydicom.Dataset()
    filled.update(source)
    if hasattr(source, "file_meta"):
        filled.file_meta = source.file_meta
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled


def _mask(masks: Mapping[str, np.ndarray], key: str, shape: tuple[int, int], name: str) -> np.ndarray:
    if key not in masks:
        raise DicomWriteError(f"{name}: masks[{key!r}] is missing (expected 'lung' and 'infection')")
    m = np.asarray(masks[key])
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != shape:
        raise DicomWriteError(f"{name}: masks[{key!r}] has shape {m.shape}; the source is {shape[0]} x {shape[1]} "
                              f"(Rows x Columns): masks must be at the source's own size")
    return m != 0


@dataclass(frozen=True)
class Figures:
    """The severity figures an SR reports (`figures_of`): assessed or not (and why), percents per patient side and
    in total, the grade."""

    assessed: bool
    reason: str = ""
    right: float | None = None
    left: float | None = None
    total: float | None = None
    grade: str | None = None


def figures_of(severity: Mapping[str, Any], name: str = "severity") -> Figures:
    """The `Figures` of predict's JSON record (keys ``assessed``, ``reason``, ``severity`` = {``left``, ``right``,
    ``total``, ``grade``}); `DicomWriteError` naming the missing or invalid entry."""
    from covidseg_tf.inference.postprocess import SEVERITY_BANDS

    if "assessed" not in severity:
        raise DicomWriteError(f"{name}: severity['assessed'] is missing")
    if not severity["assessed"]:
        reason = severity.get("reason")
        if not reason:
            raise DicomWriteError(f"{name}: severity['reason'] is missing: a not-assessed image needs its reason")
        return Figures(assessed=False, reason=str(reason))
    block = severity.get("severity")
    if not isinstance(block, Mapping):
        raise DicomWriteError(f"{name}: severity['severity'] is missing (expected left, right, total, grade)")
    values: dict[str, float] = {}
    for key in ("left", "right", "total"):
        v = block.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 100.0:
            raise DicomWriteError(f"{name}: severity['severity'][{key!r}] is {v!r}; a percentage 0..100 expected")
        values[key] = float(v)
    grades = ("none",) + tuple(g for _, g in SEVERITY_BANDS)
    grade = block.get("grade")
    if grade not in grades:
        raise DicomWriteError(f"{name}: severity['severity']['grade'] is {grade!r}; one of {', '.join(grades)} "
                              "expected")
    return Figures(assessed=True, right=values["right"], left=values["left"], total=values["total"], grade=grade)


def mirrored(source: pydicom.Dataset) -> bool:
    """True when the source's Patient Orientation says its columns run towards the patient's right (a mirrored
    PA/AP view): the image-left lung is then the patient's left (see the module docstring, Sides)."""
    orientation = source.get("PatientOrientation")
    if not orientation:
        return False
    first = str(orientation[0] if not isinstance(orientation, str) else orientation.split("\\")[0]).upper()
    return first.startswith("R")


def lung_sides(lung: np.ndarray, source_mirrored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(patient's right lung, patient's left lung) boolean masks of an H x W lung mask, split at
    `postprocess.split_columns` (the columns `postprocess.severity` splits at); `source_mirrored` swaps them."""
    from covidseg_tf.inference.postprocess import split_columns

    lung = np.asarray(lung) != 0
    split = int(split_columns(lung[np.newaxis].astype(np.float32)).numpy()[0])
    image_left = lung.copy()
    image_left[:, split:] = False
    image_right = lung & ~image_left
    return (image_right, image_left) if source_mirrored else (image_left, image_right)


# ----------------------------------------------------------------------------------------------- SEG
def build_seg(source: pydicom.Dataset, masks: Mapping[str, np.ndarray], algorithm: Algorithm,
              name: str | None = None) -> hd.seg.Segmentation:
    """The DICOM Segmentation (BINARY; segments `RIGHT_LUNG`, `LEFT_LUNG`, `INFECTION`, one frame each, empty ones
    kept) of `masks` on `source` (module docstring: Inputs, Sides, Geometry); `name` names the source in errors and
    log lines (default: its file name)."""
    import highdicom as hd

    from covidseg_tf.report import INFECTION_RGB, LUNG_RGB

    check_source(source, name)
    name = _source_name(source, name)
    source = with_type2_attributes(source, name)
    shape = (int(source.Rows), int(source.Columns))
    lung, infection = _mask(masks, "lung", shape, name), _mask(masks, "infection", shape, name)
    flip = mirrored(source)
    if flip:
        log.warning("%s: Patient Orientation %s: the image is mirrored, so the image-left lung is the patient's "
                    "left", name, source.get("PatientOrientation"))
    right, left = lung_sides(lung, flip)
    c = concepts()
    algo = algorithm.for_seg()

    def segment(number: int, label: str, category: Any, kind: Any, rgb: tuple[int, int, int],
                regions: list[Any] | None = None) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, anatomic_regions=regions,
            display_color=hd.color.CIELabColor.from_rgb(*rgb))

    descriptions = [segment(RIGHT_LUNG, "Right lung", c["anatomy"], c["right_lung"], LUNG_RGB),
                    segment(LEFT_LUNG, "Left lung", c["anatomy"], c["left_lung"], LUNG_RGB),
                    segment(INFECTION, "Infection", c["abnormal"], c["opacity"], INFECTION_RGB, [c["lung"]])]
    pixels = np.stack([right, left, infection], axis=-1)[np.newaxis].astype(np.uint8)  # (1, H, W, segments)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=algorithm.name,
            manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
            device_serial_number=_device_uid(algorithm), content_label="COVIDSEG",
            content_description="Lungs and COVID-19 infection",
            series_description=SERIES_DESCRIPTION.format(what="segmentation"), omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom's checks of the source
        raise DicomWriteError(f"{name}: cannot make a DICOM SEG of it: {type(e).__name__}: {e}") from e
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:  # no patient coordinate system: a projection X-ray
        # General Image module, Type 2C: such a SEG carries the source's Patient Orientation (empty when the source
        # has none); highdicom 0.28 does not copy it
        seg.PatientOrientation = source.get("PatientOrientation", "")
        # Pixel Measures without a plane position and orientation would place the segments in no coordinate
        # system (and with a Frame of Reference dciodvfy then wants a Slice Thickness an X-ray does not have):
        # the SEG is the source's pixel grid, referenced frame by frame (module docstring, Geometry)
        if "PixelMeasuresSequence" in shared:
            del shared.PixelMeasuresSequence
    return seg


# ----------------------------------------------------------------------------------------------- SR
def build_sr(source: pydicom.Dataset, seg: hd.seg.Segmentation, severity: Mapping[str, Any],
             algorithm: Algorithm, name: str | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report (a Comprehensive 3D SR) of `severity` (predict's JSON record) on `source`,
    whose per-segment groups reference the segments of `seg` (`build_seg`'s); module docstring: Sides, Not
    assessed. `name` as in `build_seg`."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    check_source(source, name)
    name = _source_name(source, name)
    source = with_type2_attributes(source, name)
    fig = figures_of(severity, name)
    c = concepts()
    algo = algorithm.for_sr()
    flip = mirrored(source)
    # the figures are per patient side as postprocess.severity names them (image left = patient's right); a mirrored
    # source swaps them, as build_seg swaps the segments
    right, left = (fig.left, fig.right) if flip else (fig.right, fig.left)
    source_ref = hd.sr.SourceImageForSegmentation.from_source_image(source)

    def tracking(label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(identifier=label, uid=hd.UID())

    def share(value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=c["infected_share"], value=float(value), unit=c["percent"])

    def roi_group(segment: int, label: str, finding: Any, value: float,
                  evaluations: list[hd.sr.QualitativeEvaluation] | None = None,
                  sites: list[hd.sr.FindingSite] | None = None) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        ref = hd.sr.ReferencedSegmentationFrame(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                                frame_number=segment, segment_number=segment, source_image=source_ref)
        # PS3.3 Table 10-3 (Image SOP Instance Reference Macro): Referenced Segment Number shall not be present
        # with a Referenced Frame Number (dciodvfy reports it as an error); frame `segment` holds segment
        # `segment` (build_seg: one frame per segment, none omitted), so the frame number says it all
        del ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(label), referenced_segment=ref, finding_type=finding, algorithm_id=algo,
            finding_sites=sites, measurements=[share(value)], qualitative_evaluations=evaluations)

    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking("Image"), algorithm_id=algo,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["assessed"], c["yes"] if fig.assessed else c["no"])])
    if not fig.assessed:  # TID 1501 is extensible: the reason as one more TEXT item of the image's group
        image_group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=c["reason"], value=fig.reason, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    groups: list[Any] = [image_group]
    if fig.assessed:
        groups += [
            roi_group(RIGHT_LUNG, "Right lung", c["right_lung"], right),
            roi_group(LEFT_LUNG, "Left lung", c["left_lung"], left),
            roi_group(INFECTION, "Infection", c["opacity"], fig.total,
                      evaluations=[hd.sr.QualitativeEvaluation(c["severity"], c["grades"][fig.grade])],
                      sites=[hd.sr.FindingSite(c["lung"])]),
        ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(algorithm), name=algorithm.name, manufacturer_name=algorithm.name,
        model_name=f"{algorithm.name} {algorithm.version}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(_observer_device()), observer_identifying_attributes=device))
    missing = library_problem(source)
    if missing:
        log.warning("%s: %s: the SR has no Image Library (module docstring, Geometry)", name, missing)
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=c["procedure"],
                                     imaging_measurements=groups, referenced_images=None if missing else [source])
    scheme = CodingSchemeIdentificationItem(designator=CODING_SCHEME, name="covidseg-tf local codes",
                                                  responsible_organization=algorithm.name)
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=[source, seg], content=report, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=algorithm.name, is_complete=True,
            series_description=SERIES_DESCRIPTION.format(what="measurement report"), coding_schemes=[scheme])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DicomWriteError(f"{name}: cannot make a DICOM SR of it: {type(e).__name__}: {e}") from e


PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
"""Modalities whose SR Image Library entry (TID 1603) needs Patient Orientation and Imager Pixel Spacing."""


def library_problem(source: pydicom.Dataset) -> str | None:
    """Why the source cannot have an SR Image Library entry (a projection image without two Patient Orientation
    values or without Imager Pixel Spacing; the entry records both), or None when it can."""
    if str(source.get("Modality", "")) not in PROJECTION_MODALITIES:
        return None
    orientation = source.get("PatientOrientation")
    if orientation is None or isinstance(orientation, str) or len(orientation) != 2:
        return f"no Patient Orientation (two values) ({orientation!r})"
    spacing = source.get("ImagerPixelSpacing")
    if spacing is None or isinstance(spacing, (str, float, int)) or len(spacing) != 2:
        return "no Imager Pixel Spacing (two values)"
    return None


def _observer_device() -> Any:
    from pydicom.sr.codedict import codes

    return codes.DCM.Device


def _device_uid(algorithm: Algorithm) -> str:
    """A UID for the algorithm as an SR observer device: the same for the same name, version and models."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[algorithm.name, algorithm.version, *sorted(algorithm.model_sha256.values())])


# ----------------------------------------------------------------------------------------------- files
def output_paths(out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """(SEG path, SR path) `write_seg_and_sr` writes: ``<out_dir>/<stem>_seg.dcm``, ``<out_dir>/<stem>_sr.dcm``."""
    out_dir = Path(out_dir)
    return out_dir / f"{stem}{SEG_SUFFIX}", out_dir / f"{stem}{SR_SUFFIX}"


def encode(dataset: pydicom.Dataset) -> bytes:
    """The bytes of a DICOM file (preamble, file meta) holding `dataset`."""
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seg_and_sr_bytes(source: pydicom.Dataset, masks: Mapping[str, np.ndarray], severity: Mapping[str, Any],
                     algorithm: Algorithm, name: str | None = None) -> tuple[bytes, bytes]:
    """The SEG (`build_seg`) and SR (`build_sr`) files of one prediction, as bytes (for a writer that writes all of
    an input's outputs together, e.g. predict's, SEG and SR before its JSON); arguments as `write_seg_and_sr`."""
    seg = build_seg(source, masks, algorithm, name)
    sr = build_sr(source, seg, severity, algorithm, name)
    return encode(seg), encode(sr)


def _write(data: bytes, path: Path) -> None:
    tmp = partial_path(path)
    try:
        tmp.write_bytes(data)
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_seg_and_sr(source: pydicom.Dataset, masks: Mapping[str, np.ndarray], severity: Mapping[str, Any],
                     algorithm: Algorithm, out_dir: str | Path, stem: str | None = None,
                     name: str | None = None) -> tuple[Path, Path]:
    """Write the SEG (`build_seg`) and SR (`build_sr`) of one prediction on the DICOM dataset `source` (its pixel
    data is not needed: a header read with ``stop_before_pixels`` will do) into `out_dir` as
    `output_paths(out_dir, stem)` (stem defaults to the source's SOP Instance UID), each atomically, the SR last;
    returns (SEG path, SR path). Both are built before either is written: bad input (`DicomWriteError`, naming the
    source as `name` or its file name) writes nothing. See the module docstring for the inputs and an example."""
    seg, sr = seg_and_sr_bytes(source, masks, severity, algorithm, name)
    seg_path, sr_path = output_paths(out_dir, stem or str(source.SOPInstanceUID))
    seg_path.parent.mkdir(parents=True, exist_ok=True)
    _write(seg, seg_path)
    _write(sr, sr_path)
    return seg_path, sr_path
