"""covidseg_tf.dicom: the DICOM Segmentation and TID 1500 SR of a prediction, checked by a real validator (dciodvfy,
Debian's dicom3tools) and read back with highdicom.

Inputs are real-looking DX / CR files made with pydicom from X-rays (the Val split of ../shared/covidqu when present,
a synthetic chest phantom always): MONOCHROME2 and MONOCHROME1, uncompressed, RLE Lossless and JPEG-LS Lossless,
with and without a Frame of Reference and Pixel Spacing. The "prediction" is the reference lung and infection
masks (no model is needed); its record is predict's own JSON record (`predict.render_outputs`).

dciodvfy: .ci/run installs it and sets COVIDSEG_REQUIRE_DCIODVFY=1, so in CI a missing validator fails the run;
elsewhere the validating tests are skipped cleanly when it is absent (the read-back tests still run).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from covidseg_tf import dicom  # noqa: E402
from covidseg_tf.imageio import decode_image  # noqa: E402
from covidseg_tf.inference import Prediction  # noqa: E402
from covidseg_tf.inference.postprocess import severity, severity_grade  # noqa: E402
from covidseg_tf.predict import render_outputs  # noqa: E402

VAL = ("Infection Segmentation Data", "Infection Segmentation Data", "Val")
ALGORITHM = dicom.Algorithm(version="0.1.0", model_sha256={"lung": "1" * 64, "infection": "2" * 64})


# ----------------------------------------------------------------------------------------------- source files
def make_source(path: Path, gray: np.ndarray, modality: str = "DX", photometric: str = "MONOCHROME2",
                transfer_syntax: str = ExplicitVRLittleEndian, frame_of_reference: bool = False,
                pixel_spacing: bool = False, orientation: tuple[str, str] | None = ("L", "F"),
                slope: float = 1.0, intercept: float = 0.0) -> Path:
    """A 12-bit chest X-ray DICOM file of the uint8 image `gray`: stored = 16 * gray (MONOCHROME2) or
    4095 - 16 * gray (MONOCHROME1: high values dark), minus `intercept`, divided by `slope`, so that the
    rescaled, stretched (and for MONOCHROME1 inverted) image predict decodes is `gray` again."""
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "CQ-0001", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "101010", "1", "A0001"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if orientation is not None:
        ds.PatientOrientation = list(orientation)
    ds.ImagerPixelSpacing = [0.139, 0.139]
    if pixel_spacing:
        ds.PixelSpacing = [0.139, 0.139]
    if frame_of_reference:
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageLaterality, ds.DetectorType = "FOR PRESENTATION", "U", "DIRECT"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.LossyImageCompression, ds.BurnedInAnnotation = "00", "NO"
        ds.RescaleType = "US"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    value = gray.astype(np.float64) * 16.0
    if photometric == "MONOCHROME1":
        value = 4095.0 - value
    stored = np.round((value - intercept) / slope)
    assert stored.min() >= 0 and stored.max() <= 4095
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def phantom_case(h: int = 96, w: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey X-ray, lung mask, infection mask) of a synthetic chest: two dark lung fields, the image-left one (the
    patient's right) with a brighter infected patch, so the two sides have different severities."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    lung = np.zeros((h, w), np.uint8)
    for cx in (0.3, 0.7):
        lung[((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1] = 1
    infection = (((x - 0.3) / 0.08) ** 2 + ((y - 0.6) / 0.1) ** 2 < 1).astype(np.uint8) & lung
    gray = np.where(lung == 1, 60, 200).astype(np.uint8)
    gray[infection == 1] = 120
    gray[0, 0], gray[-1, -1] = 0, 255  # the whole 8-bit range: decoding stretches min..max
    return gray, lung, infection


def val_case(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey X-ray stretched to 0..255, lung mask, infection mask inside the lungs) of a Val COVID-19 image."""
    from PIL import Image

    from covidseg_tf.imageio import to_uint8

    base = root.joinpath(*VAL, "COVID-19")
    gray = to_uint8(np.asarray(Image.open(base / "images" / name).convert("L")))
    lung = (np.asarray(Image.open(base / "lung masks" / name).convert("L")) > 127).astype(np.uint8)
    infection = (np.asarray(Image.open(base / "infection masks" / name).convert("L")) > 127).astype(np.uint8) & lung
    return gray, lung, infection


def predict_record(gray: np.ndarray, lung: np.ndarray, infection: np.ndarray, tmp: Path,
                   assessed: bool = True, reason: str = "") -> dict:
    """predict's JSON record (`predict.render_outputs`) of a prediction made of these masks, severity computed by
    `postprocess.severity` as `Predictor.predict` computes it."""
    sev = {k: float(v.numpy()[0]) for k, v in severity(lung[None].astype(np.float32),
                                                        infection[None].astype(np.float32)).items()}
    pred = Prediction(lung=lung, infection=infection, assessed=assessed, reason=reason, **sev)
    record, _ = render_outputs("x.dcm", gray, pred, str(tmp / "x"), {})
    return record


# ----------------------------------------------------------------------------------------------- the validator
def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for a file; skips without the tool (fails in CI, which installs it)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("COVIDSEG_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is not installed, but .ci/run installs it")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    assert out.returncode == 0 or errors, f"dciodvfy failed on {path}: {out.stderr}"
    return errors, warnings


# ----------------------------------------------------------------------------------------------- checks
def decoded_segments(seg_path: Path, source: Dataset) -> np.ndarray:
    """(H, W, 3) bool: the SEG's segments 1..3 of the source's only frame, read back with highdicom."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                               segment_numbers=[1, 2, 3])
    assert pixels.shape == (1, source.Rows, source.Columns, 3)
    return pixels[0].astype(bool)


def share(infection: np.ndarray, region: np.ndarray) -> float:
    return 100.0 * np.count_nonzero(infection & region) / max(np.count_nonzero(region), 1)


def check_references(seg: Dataset, sr: Dataset, source: Dataset, algorithm: dicom.Algorithm = ALGORITHM) -> None:
    """Both in the source's study and new series with new UIDs, referencing the source; "not for clinical use";
    the SEG names `algorithm`'s model digests."""
    for ds, what in ((seg, "SEG"), (sr, "SR")):
        assert ds.StudyInstanceUID == source.StudyInstanceUID, what
        assert ds.PatientID == source.get("PatientID", ""), what
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID, what
        assert ds.SOPInstanceUID != source.SOPInstanceUID, what
        assert "NOT FOR CLINICAL USE" in ds.SeriesDescription, what
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID and seg.SOPInstanceUID != sr.SOPInstanceUID
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame derived from the source image
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
    if "FrameOfReferenceUID" in source:
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    else:
        assert "FrameOfReferenceUID" not in seg
    # an X-ray has no patient coordinate system: no Pixel Measures in the SEG; the spacing is in the SR's library
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert seg.PatientOrientation == source.get("PatientOrientation", "")
    library = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    if dicom.library_problem(source) is None:  # TID 1600 Image Library: the source, its orientation and spacing
        entry = library[0].ContentSequence[0].ContentSequence[0]
        assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        spacing = {d.ConceptNameCodeSequence[0].CodeMeaning: float(d.MeasuredValueSequence[0].NumericValue)
                   for d in entry.ContentSequence if d.ValueType == "NUM" and "Spacing" in
                   d.ConceptNameCodeSequence[0].CodeMeaning}
        assert spacing == {"Horizontal Pixel Spacing": float(source.ImagerPixelSpacing[1]),
                           "Vertical Pixel Spacing": float(source.ImagerPixelSpacing[0])}
    else:
        assert library == []
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert all(digest in params for digest in algorithm.model_sha256.values())


def sr_groups(sr_path: Path) -> tuple[dict[str, object], object]:
    """({tracking identifier: TID 1410 group}, the TID 1501 image group) of the SR, read with highdicom."""
    sr = hd.sr.srread(sr_path)
    report = sr.content
    rois = {g.tracking_identifier: g for g in report.get_planar_roi_measurement_groups()}
    images = report.get_image_measurement_groups()
    assert len(images) == 1
    return rois, images[0]


def evaluation(group: object, name: object) -> object:
    found = [e for e in group.get_qualitative_evaluations(name=name)]
    assert len(found) == 1
    return found[0].value


def write_case(tmp: Path, gray: np.ndarray, lung: np.ndarray, infection: np.ndarray, name: str,
               **source_kw: object) -> tuple[Dataset, dict, Path, Path]:
    """Make a source file of `gray` (`make_source`), check that predict decodes it to `gray` (same pixels, same
    orientation: the masks are at its pixels), write SEG + SR from the masks; (source, predict's record, SEG path,
    SR path)."""
    path = make_source(tmp / f"{name}.dcm", gray, **source_kw)
    data = path.read_bytes()
    decoded = decode_image(data, str(path)).gray  # what predict runs the cascade on
    assert decoded.shape == gray.shape
    assert int(np.abs(decoded.astype(int) - gray.astype(int)).max()) <= 1
    source = pydicom.dcmread(io.BytesIO(data))
    assert source.file_meta.TransferSyntaxUID == source_kw.get("transfer_syntax", ExplicitVRLittleEndian)
    record = predict_record(gray, lung, infection, tmp)
    seg_path, sr_path = dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM,
                                               tmp / "out", stem=name)
    assert (seg_path, sr_path) == dicom.output_paths(tmp / "out", name)
    assert not list((tmp / "out").glob(".*partial*"))
    return source, record, seg_path, sr_path


def validate(*paths: Path) -> list[str]:
    """dciodvfy's warnings of the files (printed); fails on any error."""
    errors, warnings = [], []
    for p in paths:
        e, w = dciodvfy(p)
        errors += [f"{p.name}: {x}" for x in e]
        warnings += [f"{p.name}: {x}" for x in w]
    assert errors == []
    print("\n".join(warnings))
    return warnings


def check_readback(source: Dataset, record: dict, seg_path: Path, sr_path: Path, lung: np.ndarray,
                   infection: np.ndarray, mirrored: bool = False, algorithm: dicom.Algorithm = ALGORITHM) -> None:
    """Read SEG and SR back: references, segments equal to the masks pixel for pixel, sides as the severity's,
    the SR's numbers equal to predict's record, each group referencing its segment."""
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    check_references(seg, sr, source, algorithm)
    segments = decoded_segments(seg_path, source)
    right, left, inf = segments[..., 0], segments[..., 1], segments[..., 2]
    lung_b, inf_b = lung.astype(bool), infection.astype(bool)
    assert np.array_equal(right | left, lung_b) and not (right & left).any()  # the lung mask, pixel for pixel
    assert np.array_equal(inf, inf_b)
    assert right.any() and left.any()
    sev = record["severity"]
    # the side segments carry exactly the numbers the severity gives each patient side
    expect_right, expect_left = (sev["left"], sev["right"]) if mirrored else (sev["right"], sev["left"])
    assert share(inf_b, right) == pytest.approx(expect_right, abs=1e-3)
    assert share(inf_b, left) == pytest.approx(expect_left, abs=1e-3)
    # in image terms: the patient's right lung is on the image left unless the source says it is mirrored
    right_cols = np.nonzero(right.any(axis=0))[0]
    left_cols = np.nonzero(left.any(axis=0))[0]
    assert (right_cols.max() < left_cols.min()) != mirrored

    rois, image_group = sr_groups(sr_path)
    assert set(rois) == {"Right lung", "Left lung", "Infection"}
    for label, number, value in (("Right lung", 1, expect_right), ("Left lung", 2, expect_left),
                                 ("Infection", 3, sev["total"])):
        group = rois[label]
        ref = group.referenced_segmentation_frame
        assert ref is not None
        item = ref[0].ReferencedSOPSequence[0]
        assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID and int(item.ReferencedFrameNumber) == number
        frame = seg.PerFrameFunctionalGroupsSequence[number - 1]  # that frame holds that segment
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        assert seg.SegmentSequence[number - 1].SegmentLabel == label
        measurements = group.get_measurements()
        assert len(measurements) == 1
        assert measurements[0].value == value  # exactly predict's JSON number
        assert measurements[0].unit == codes.UCUM.Percent
    grade = evaluation(rois["Infection"], codes.SCT.Severity)
    assert grade.meaning.lower() == sev["grade"] == severity_grade(sev["total"])
    assert evaluation(image_group, dicom.concepts()["assessed"]) == codes.SCT.Yes


# ----------------------------------------------------------------------------------------------- tests
CASES = {  # name: source options
    "dx_mono2_jpegls_for": dict(modality="DX", transfer_syntax=JPEGLSLossless, frame_of_reference=True,
                                pixel_spacing=True, slope=2.0, intercept=-100.0),
    "cr_mono1_rle": dict(modality="CR", photometric="MONOCHROME1", transfer_syntax=RLELossless),
    "dx_mono1_plain": dict(modality="DX", photometric="MONOCHROME1"),
    "cr_mono2_no_orientation": dict(modality="CR", orientation=None),
    "dx_mirrored": dict(modality="DX", orientation=("R", "F")),
}


def mirrored_case(name: str) -> bool:
    return (CASES[name].get("orientation") or ("L", "F"))[0] == "R"


@pytest.mark.parametrize("name", sorted(CASES))
def test_synthetic_roundtrip(tmp_path: Path, name: str) -> None:
    gray, lung, infection = phantom_case()
    written = write_case(tmp_path, gray, lung, infection, name, **CASES[name])
    check_readback(*written, lung, infection, mirrored=mirrored_case(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_synthetic_dciodvfy(tmp_path: Path, name: str) -> None:
    gray, lung, infection = phantom_case()
    validate(*write_case(tmp_path, gray, lung, infection, name, **CASES[name])[2:])


VAL_CASES = ["dx_mono2_jpegls_for", "cr_mono1_rle", "dx_mono1_plain"]


@pytest.fixture(scope="module")
def val_images(shared_covidqu: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """The first three Val COVID-19 X-rays with infection in both lungs, and their reference masks."""
    tmp = tmp_path_factory.mktemp("val")
    folder = shared_covidqu.joinpath(*VAL, "COVID-19", "images")
    chosen = []
    for n in sorted(p.name for p in folder.glob("*.png")):
        gray, lung, infection = val_case(shared_covidqu, n)
        sev = predict_record(gray, lung, infection, tmp)["severity"]
        if sev["left"] > 0 and sev["right"] > 0:
            chosen.append((gray, lung, infection))
        if len(chosen) == len(VAL_CASES):
            return chosen
    raise AssertionError(f"fewer than {len(VAL_CASES)} Val COVID-19 images with infection in both lungs")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", VAL_CASES)
def test_val_roundtrip_and_dciodvfy(tmp_path: Path, val_images: list[tuple], name: str) -> None:
    """Val X-rays as DX / CR files (JPEG-LS, RLE, MONOCHROME1), their reference masks as the prediction."""
    gray, lung, infection = val_images[VAL_CASES.index(name)]
    written = write_case(tmp_path, gray, lung, infection, name, **CASES[name])
    check_readback(*written, lung, infection, mirrored=mirrored_case(name))
    validate(*written[2:])


def test_not_assessed(tmp_path: Path) -> None:
    """An image the gate refused: empty segments, and an SR that says "No" and why, with no numbers or grade."""
    gray, lung, infection = phantom_case()
    path = make_source(tmp_path / "na.dcm", gray, modality="CR", photometric="MONOCHROME1")
    source = pydicom.dcmread(path)
    empty = np.zeros_like(lung)
    reason = "not a frontal chest X-ray: noise-like: roughness 0.91 > 0.5"
    record = predict_record(gray, empty, empty, tmp_path, assessed=False, reason=reason)
    assert record["severity"]["total"] is None
    seg_path, sr_path = dicom.write_seg_and_sr(source, {"lung": empty, "infection": empty}, record, ALGORITHM,
                                               tmp_path / "out", stem="na")
    assert not decoded_segments(seg_path, source).any()
    rois, image_group = sr_groups(sr_path)
    assert rois == {}
    assert evaluation(image_group, dicom.concepts()["assessed"]) == codes.SCT.No
    texts = [item.TextValue for item in image_group[0].ContentSequence if item.ValueType == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeValue == dicom.concepts()["reason"].value]
    assert texts == [reason]
    assert not hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    validate(seg_path, sr_path)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows"])
def test_missing_source_attribute_is_named(tmp_path: Path, keyword: str) -> None:
    gray, lung, infection = phantom_case()
    source = pydicom.dcmread(make_source(tmp_path / "src.dcm", gray))
    record = predict_record(gray, lung, infection, tmp_path)
    delattr(source, keyword)
    with pytest.raises(dicom.DicomWriteError, match=keyword):
        dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_patient_and_study_attributes_are_written_empty(tmp_path: Path) -> None:
    """A de-identified source without patient name / ID / birth date / sex, study date / time / ID, accession number
    still gets a valid SEG and SR, with those attributes empty; the caller's dataset is not changed."""
    gray, lung, infection = phantom_case()
    source = pydicom.dcmread(make_source(tmp_path / "anon.dcm", gray, modality="CR"))
    for keyword in dicom.TYPE2_SOURCE_ATTRIBUTES:
        delattr(source, keyword)
    record = predict_record(gray, lung, infection, tmp_path)
    paths = dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM,
                                   tmp_path / "out", name="anon.dcm")
    assert not any(keyword in source for keyword in dicom.TYPE2_SOURCE_ATTRIBUTES)
    for p in paths:
        ds = pydicom.dcmread(p)
        assert all(keyword in ds and not ds[keyword].value for keyword in dicom.TYPE2_SOURCE_ATTRIBUTES), p.name
    check_readback(source, record, *paths, lung, infection)
    validate(*paths)


def test_bad_masks_and_figures_are_named(tmp_path: Path) -> None:
    gray, lung, infection = phantom_case()
    path = make_source(tmp_path / "src.dcm", gray)
    source = pydicom.dcmread(path)
    record = predict_record(gray, lung, infection, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(dicom.DicomWriteError, match=r"src\.dcm.*masks\['lung'\] has shape \(10, 10\)"):
        dicom.write_seg_and_sr(source, {"lung": lung[:10, :10], "infection": infection}, record, ALGORITHM, out)
    with pytest.raises(dicom.DicomWriteError, match=r"^given\.dcm: masks\['lung'\]"):  # the name the caller gives
        dicom.write_seg_and_sr(source, {"lung": lung[:10, :10], "infection": infection}, record, ALGORITHM, out,
                               name="given.dcm")
    with pytest.raises(dicom.DicomWriteError, match=r"masks\['infection'\] is missing"):
        dicom.write_seg_and_sr(source, {"lung": lung}, record, ALGORITHM, out)
    bad = dict(record, severity=dict(record["severity"], total=130.0))
    with pytest.raises(dicom.DicomWriteError, match=r"severity\['severity'\]\['total'\] is 130.0"):
        dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, bad, ALGORITHM, out)
    bad = dict(record, severity=dict(record["severity"], grade="awful"))
    with pytest.raises(dicom.DicomWriteError, match="grade"):
        dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, bad, ALGORITHM, out)
    with pytest.raises(dicom.DicomWriteError, match="reason"):
        dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, {"assessed": False}, ALGORITHM, out)
    source.NumberOfFrames = 2
    with pytest.raises(dicom.DicomWriteError, match="NumberOfFrames"):
        dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM, out)
    assert not out.exists()


def test_header_only_source_and_bytes(tmp_path: Path) -> None:
    """A source read without its pixel data (`stop_before_pixels`, as predict can read it cheaply) gives the same
    SEG pixels and SR numbers; `seg_and_sr_bytes` gives the files' bytes."""
    gray, lung, infection = phantom_case()
    path = make_source(tmp_path / "h.dcm", gray, modality="CR", photometric="MONOCHROME1", transfer_syntax=RLELossless)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in header
    record = predict_record(gray, lung, infection, tmp_path)
    seg, sr = dicom.seg_and_sr_bytes(header, {"lung": lung, "infection": infection}, record, ALGORITHM)
    paths = dicom.output_paths(tmp_path / "out", "h")
    paths[0].parent.mkdir()
    for p, data in zip(paths, (seg, sr)):
        p.write_bytes(data)
        assert data[128:132] == b"DICM"
    check_readback(header, record, *paths, lung, infection)
    validate(*paths)


def test_algorithm_from_predict_models() -> None:
    models = {"lung": {"sha256": "a" * 64}, "infection": {"sha256": "b" * 64}, "covidseg_tf": "9.9.9"}
    algo = dicom.Algorithm.from_models(models)
    assert (algo.name, algo.version) == ("covidseg-tf", "9.9.9")
    assert algo.parameters() == {"infection model sha256": "b" * 64, "lung model sha256": "a" * 64}


def test_outputs_replace_earlier_ones_atomically(tmp_path: Path) -> None:
    """A rerun replaces the files (new UIDs each time) and leaves no temporary file behind."""
    gray, lung, infection = phantom_case()
    source = pydicom.dcmread(make_source(tmp_path / "src.dcm", gray))
    record = predict_record(gray, lung, infection, tmp_path)
    first = dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM, tmp_path)
    uid = pydicom.dcmread(first[0]).SOPInstanceUID
    second = dicom.write_seg_and_sr(source, {"lung": lung, "infection": infection}, record, ALGORITHM, tmp_path)
    assert first == second and first[0].name == f"{source.SOPInstanceUID}_seg.dcm"
    assert pydicom.dcmread(second[0]).SOPInstanceUID != uid
    assert pydicom.dcmread(second[1]).CurrentRequestedProcedureEvidenceSequence  # a complete file
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# ----------------------------------------------------------------------------------------------- predict --dicom
def _mask(path: Path) -> np.ndarray:
    from PIL import Image

    return (np.asarray(Image.open(path)) > 0).astype(np.uint8)


def test_predict_dicom_writes_seg_and_sr_for_dicom_inputs_only(tmp_path: Path, shared_covidqu: Path) -> None:
    """`predict --dicom` with the shipped models on a Val X-ray as a MONOCHROME1 RLE CR and the same X-ray as a PNG:
    the DICOM input gets a SEG and an SR (named in its JSON) whose segments are predict's mask PNGs pixel for pixel
    and whose numbers are its JSON's; the PNG input gets no DICOM files."""
    import json

    from PIL import Image

    from covidseg_tf import predict

    gray, _, _ = val_case(shared_covidqu, "covid_1902.png")
    (tmp_path / "in").mkdir()
    src = make_source(tmp_path / "in" / "cr.dcm", gray, modality="CR", photometric="MONOCHROME1",
                      transfer_syntax=RLELossless)
    Image.fromarray(gray).save(tmp_path / "in" / "plain.png")
    assert predict.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--dicom", "--quiet"]) == 0
    base = tmp_path / "out" / "in"
    record = json.loads((base / "cr.json").read_text())
    assert record["assessed"] and record["outputs"]["seg"] == str(base / "cr_seg.dcm")
    assert record["outputs"]["sr"] == str(base / "cr_sr.dcm")
    lung, infection = _mask(base / "cr_lung.png"), _mask(base / "cr_infection.png")
    assert infection.any()
    check_readback(pydicom.dcmread(src), record, base / "cr_seg.dcm", base / "cr_sr.dcm", lung, infection,
                   algorithm=dicom.Algorithm.from_models(record["models"]))
    assert not list(base.glob("plain_*.dcm")) and "seg" not in json.loads((base / "plain.json").read_text())["outputs"]
    if shutil.which("dciodvfy"):
        validate(base / "cr_seg.dcm", base / "cr_sr.dcm")


def test_predict_dicom_reruns_and_failures(tmp_path: Path) -> None:
    """An earlier run's DICOM outputs count as outputs: a rerun without --overwrite is refused (exit 2); with
    --overwrite and without --dicom they are removed (no stale SEG beside a fresh JSON). A DICOM input a SEG
    cannot be made for (no Study Instance UID) fails alone with --dicom (exit 1, nothing of it written) and is
    predicted as usual without it."""
    import json

    from covidseg_tf import predict

    gray, _, _ = phantom_case(128, 128)
    for d in ("in", "in2"):
        (tmp_path / d).mkdir()
    make_source(tmp_path / "in" / "a.dcm", gray)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "in"), "--out", str(out), "--dicom", "--quiet"]) == 0
    stem = out / "in" / "a"
    assert {p.name for p in stem.parent.iterdir()} == {"a_lung.png", "a_infection.png", "a_overlay.png",
                                                       "a_seg.dcm", "a_sr.dcm", "a.json"}
    (stem.parent / "a.json").unlink()
    assert predict.main([str(tmp_path / "in"), "--out", str(out), "--quiet"]) == 2  # the SEG is an earlier output
    assert predict.main([str(tmp_path / "in"), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (stem.parent / "a_seg.dcm").exists() and not (stem.parent / "a_sr.dcm").exists()
    assert set(json.loads((stem.parent / "a.json").read_text())["outputs"]) == {"lung", "infection", "overlay"}

    bad = make_source(tmp_path / "in2" / "b.dcm", gray)
    ds = pydicom.dcmread(bad)
    del ds.StudyInstanceUID
    ds.save_as(bad)
    make_source(tmp_path / "in2" / "c.dcm", gray)
    out2 = tmp_path / "out2"
    assert predict.main([str(tmp_path / "in2"), "--out", str(out2), "--dicom", "--quiet"]) == 1
    assert not list((out2 / "in2").glob("b*")) and (out2 / "in2" / "c_seg.dcm").exists()
    assert predict.main([str(bad), "--out", str(tmp_path / "out3"), "--quiet"]) == 0


def test_batch_predict_dicom(tmp_path: Path) -> None:
    """batch_predict --dicom: a DICOM input's SEG and SR are written beside its other outputs, listed in the run's
    manifest (so --overwrite removes them) and named in its record; the files equal predict's."""
    import json

    from covidseg_tf import batch_predict

    gray, _, _ = phantom_case(128, 128)
    (tmp_path / "in").mkdir()
    make_source(tmp_path / "in" / "a.dcm", gray)
    out = tmp_path / "out"
    assert batch_predict.main([str(tmp_path / "in" / "*.dcm"), "--output", str(out), "--dicom", "--quiet"]) == 0
    record = json.loads((out / "summary.jsonl").read_text().splitlines()[0])
    seg, sr = Path(record["outputs"]["seg"]), Path(record["outputs"]["sr"])
    assert seg.exists() and sr.exists() and seg.name == "a_seg.dcm"
    manifest = (out / batch_predict.MANIFEST).read_text()
    assert str(seg.relative_to(out)) in manifest and str(sr.relative_to(out)) in manifest
    source = pydicom.dcmread(tmp_path / "in" / "a.dcm")
    check_references(pydicom.dcmread(seg), pydicom.dcmread(sr), source, dicom.Algorithm.from_models(record["models"]))
