"""The browser viewer (covidseg_tf.viewer): path confinement, upload limits, the folder list and its sorting, the
uploads' numbers against predict's, the command line, and the page in a real headless Chromium.

The Chromium tests need Debian's `chromium` and `chromium-driver` and the `selenium` package: .ci/run installs
them and sets COVIDSEG_REQUIRE_CHROMIUM=1, so in CI a missing browser fails the run; elsewhere those tests skip.
COVIDSEG_VIEWER_SCREENSHOT=docs/img/viewer.png also saves the Val test's page as the docs' screenshot.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, phantom, skip_if_sigint_ignored, write_dicom
from PIL import Image

from covidseg_tf import predict, viewer
from covidseg_tf.viewer import MAX_UPLOAD_BYTES, Outside, Viewer, confined, create_app, folder_entries, sort_entries

VAL_COVID = Path("Infection Segmentation Data/Infection Segmentation Data/Val/COVID-19/images")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def predictor():
    from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL
    from covidseg_tf.inference import Predictor

    return Predictor.load(DEFAULT_LUNG_MODEL, DEFAULT_INFECTION_MODEL)


def record_of(file: str, total: float | None, left: float | None = None, right: float | None = None,
              reason: str | None = None) -> dict:
    """A predict-shaped JSON record (the keys the folder list reads) with the given severities."""
    assessed = total is not None
    return {"file": file, "input_sha256": None, "size": {"height": 8, "width": 8}, "assessed": assessed,
            "reason": None if assessed else reason,
            "severity": {"left": left, "right": right, "total": total, "grade": "mild" if assessed else None,
                         "unit": "percent of lung area infected"},
            "image_level": None, "outputs": {}, "models": {}}


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A folder to browse (records at the top, in a sub-folder and under images/ as batch_predict writes them, a
    JSON that is no record, a link to a record outside) and a secret file beside it."""
    root = tmp_path / "preds"
    (root / "sub").mkdir(parents=True)
    (root / "images" / "deep").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("SECRET-CONTENT\n")
    (outside / "other.json").write_text(json.dumps(record_of("x.png", 99.0)))
    records = {"a.json": record_of("a.png", 10.0, 5.0, 15.0), "sub/b.json": record_of("b.png", 70.0, 60.0, 80.0),
               "images/deep/c.json": record_of("c.png", 30.0, 40.0, 20.0),
               "images/n.json": record_of("n.png", None, reason="near-constant")}
    for rel, record in records.items():
        (root / rel).write_text(json.dumps(record))
    (root / "images" / "odd.json").write_text(json.dumps(record_of("odd.png", 5.0) | {
        "severity": {"left": "12", "right": True, "total": [1], "grade": 3}}))  # hand-edited: no numbers
    (root / "a_lung.png").write_bytes(b"\x89PNG lung")
    (root / "a_seg.dcm").write_bytes(b"DICM seg")
    (root / "config.json").write_text(json.dumps({"not": "a record"}))
    (root / "severity.csv").write_text("file,severity_total\n")
    (root / "link_out.json").symlink_to(outside / "other.json")
    (root / "link_secret.txt").symlink_to(secret)
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    (root / "link_in.txt").symlink_to(root / "severity.csv")
    return {"root": root, "secret": secret, "outside": outside}


@pytest.fixture
def client(tree):
    return create_app(Viewer(None, tree["root"])).test_client()


# ----------------------------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("rel", ["..", "../outside/secret.txt", "sub/../../outside/secret.txt", "./a.json",
                                 "sub//b.json", "", "/etc/passwd", "link_secret.txt", "link_dir/secret.txt",
                                 "link_out.json", "..\\outside\\secret.txt", "a.json\0", "C:/x", "sub",
                                 "missing.json"])
def test_confined_refuses_paths_outside_the_folder(tree, rel):
    with pytest.raises(Outside):
        confined(tree["root"], rel)


def test_confined_refuses_an_absolute_path_even_inside_the_folder(tree):
    with pytest.raises(Outside):
        confined(tree["root"], str(tree["root"] / "a.json"))


def test_confined_allows_files_inside_and_links_that_stay_inside(tree):
    root = tree["root"]
    assert confined(root, "a.json") == (root / "a.json").resolve()
    assert confined(root, "images/deep/c.json") == (root / "images/deep/c.json").resolve()
    assert confined(root, "link_in.txt") == (root / "severity.csv").resolve()


TRAVERSALS = ["/files/../outside/secret.txt", "/files/%2e%2e/outside/secret.txt", "/files/..%2foutside%2fsecret.txt",
              "/files/%2e%2e%2foutside%2fsecret.txt", "/files/%252e%252e/outside/secret.txt",
              "/files/sub/..%2f..%2foutside/secret.txt", "/files//etc/passwd", "/files/%2fetc%2fpasswd",
              "/files/link_secret.txt", "/files/link_dir/secret.txt", "/files/..%5coutside%5csecret.txt",
              "/files/a.json%00", "/api/record/..%2foutside%2fother.json", "/api/record/link_out.json",
              "/api/record/%2e%2e/outside/other.json", "/xray/..%2foutside%2fother.json", "/xray/link_out.json"]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_no_url_reaches_outside_the_folder(client, tree, url):
    response = client.get(url, follow_redirects=True)  # werkzeug merges "//" by a redirect: followed
    assert response.status_code == 404, url
    assert b"SECRET-CONTENT" not in response.data and b"x.png" not in response.data


def test_the_raw_urls_over_http_reach_nothing_outside(tree):
    """The same URLs sent byte for byte to a running server (a browser or curl would normalise some of them)."""
    app = create_app(Viewer(None, tree["root"]))
    server = viewer.serve(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for url in TRAVERSALS:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", url)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status in (308, 404), (url, response.status)  # 308: "//" merged, then 404
            assert b"SECRET-CONTENT" not in body, url
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/files/a_lung.png")
        assert conn.getresponse().read() == b"\x89PNG lung"
    finally:
        server.shutdown()


def test_files_inside_are_served(client, tree):
    assert client.get("/files/a_lung.png").data == b"\x89PNG lung"
    assert client.get("/files/sub/b.json").get_json()["file"] == "b.png"
    assert client.get("/files/link_in.txt").data == (tree["root"] / "severity.csv").read_bytes()


def test_requests_for_another_host_are_refused(client):
    """Loopback-only by default: a page on another origin (DNS rebinding) names another Host."""
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/info", headers={"Host": "127.0.0.1:8765"}).status_code == 200


def test_security_headers_and_no_network_assets(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for f in viewer.STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f
        assert client.get(f"/static/{f.name}").status_code == 200
    assert sum(f.stat().st_size for f in viewer.STATIC.iterdir()) < 50_000  # small: plain JS + CSS


# ----------------------------------------------------------------------------------------------- folder list
def test_folder_lists_the_records_only(tree):
    entries = folder_entries(tree["root"])
    assert [e["record"] for e in entries] == ["a.json", "images/deep/c.json", "images/n.json", "images/odd.json",
                                              "sub/b.json"]
    odd = entries[3]
    assert (odd["left"], odd["right"], odd["total"], odd["grade"]) == (None, None, None, "3")
    a = entries[0]
    assert (a["file"], a["left"], a["right"], a["total"], a["assessed"]) == ("a.png", 5.0, 15.0, 10.0, True)
    n = entries[2]
    assert (n["assessed"], n["reason"], n["total"]) == (False, "near-constant", None)


@pytest.mark.parametrize("key,descending,expected", [
    ("total", True, ["sub/b.json", "images/deep/c.json", "a.json", "images/n.json", "images/odd.json"]),
    ("total", False, ["a.json", "images/deep/c.json", "sub/b.json", "images/n.json", "images/odd.json"]),
    ("left", True, ["sub/b.json", "images/deep/c.json", "a.json", "images/n.json", "images/odd.json"]),
    ("right", False, ["a.json", "images/deep/c.json", "sub/b.json", "images/n.json", "images/odd.json"]),
    ("name", False, ["a.json", "images/deep/c.json", "images/n.json", "images/odd.json", "sub/b.json"]),
])
def test_sort_entries(tree, key, descending, expected):
    assert [e["record"] for e in sort_entries(folder_entries(tree["root"]), key, descending)] == expected


def test_folder_api_sorts_and_refuses_unknown_keys(client):
    body = client.get("/api/folder?sort=total&order=desc").get_json()
    assert body["folder"] == "preds"
    assert [e["total"] for e in body["entries"]] == [70.0, 30.0, 10.0, None, None]
    assert [e["total"] for e in client.get("/api/folder?sort=total&order=asc").get_json()["entries"]] == \
        [10.0, 30.0, 70.0, None, None]
    bad = client.get("/api/folder?sort=__class__")
    assert bad.status_code == 400 and "sort" in bad.get_json()["error"]


def test_without_a_folder_there_is_nothing_to_browse():
    c = create_app(Viewer(None, None)).test_client()
    assert c.get("/api/folder").status_code == 404
    assert c.get("/files/a.json").status_code == 404
    assert c.get("/api/info").get_json()["folder"] is None


def test_record_links_its_sibling_outputs(client, tree):
    body = client.get("/api/record/a.json").get_json()
    assert body["record"]["severity"]["total"] == 10.0
    assert body["links"] == {"lung": "/files/a_lung.png", "json": "/files/a.json", "seg": "/files/a_seg.dcm"}
    assert body["xray"] is None  # a.png is not in the folder
    seg = client.get(body["links"]["seg"])
    assert seg.data == b"DICM seg" and seg.headers["Content-Disposition"].startswith("attachment")


def test_xray_shown_only_from_inside_the_folder_with_the_recorded_hash(tree):
    root = tree["root"]
    Image.fromarray(phantom(64, 64)).save(root / "sub" / "x.png")
    data = (root / "sub" / "x.png").read_bytes()
    from covidseg_tf.files import sha256_bytes

    record = record_of("x.png", 20.0, 10.0, 30.0) | {"input_sha256": sha256_bytes(data)}
    (root / "sub" / "x.json").write_text(json.dumps(record))  # "file" relative to the record's folder
    (root / "sub" / "y.json").write_text(json.dumps(record | {"input_sha256": "0" * 64}))  # another file now
    (root / "sub" / "z.json").write_text(json.dumps(record | {"file": str(tree["secret"]), "input_sha256": None}))
    c = create_app(Viewer(None, root)).test_client()
    body = c.get("/api/record/sub/x.json").get_json()
    assert body["xray"] == "/xray/sub/x.json"
    png = c.get(body["xray"])
    assert png.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.data))), np.asarray(Image.open(root / "sub/x.png")))
    assert c.get("/api/record/sub/y.json").get_json()["xray"] is None
    assert c.get("/api/record/sub/z.json").get_json()["xray"] is None
    assert c.get("/xray/sub/z.json").status_code == 404


# ----------------------------------------------------------------------------------------------- uploads
def test_uploads_need_models(client):
    response = client.post("/api/predict?name=a.png", data=b"x")
    assert response.status_code == 503 and "a.png" in response.get_json()["error"]


def test_an_upload_above_the_byte_limit_is_refused_unread(predictor):
    """Over HTTP (Flask's test client rewrites Content-Length): a request declaring more than MAX_UPLOAD_BYTES is
    answered 413 naming the file from its header, before the body is read; the server then answers the next one."""
    server = viewer.serve(create_app(Viewer(predictor, None)), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(f"POST /api/predict?name=huge.dcm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      f"application/octet-stream\r\nContent-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n".encode()
                      + b"\0" * 65536)
            answer = b""
            while b"}" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        assert json.loads(body)["error"].startswith(f"huge.dcm: the upload is larger than {MAX_UPLOAD_BYTES} bytes")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/api/info")
        assert conn.getresponse().status == 200
    finally:
        server.shutdown()


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(predictor):
    """The viewer with the shipped models (no folder), as a Flask test client."""
    return create_app(Viewer(predictor, None)).test_client()


@pytest.mark.parametrize("name,data,words", [
    ("wide.png", _png_bytes(np.zeros((2, 4097), np.uint8)), ["wide.png", "4097", "4096"]),
    ("garbage.jpg", b"not an image at all", ["garbage.jpg", "not an image"]),
    ("empty.dcm", b"", ["empty.dcm", "empty"]),
    ("truncated.png", _png_bytes(phantom(64, 64))[:80], ["truncated.png"]),
])
def test_bad_uploads_get_an_error_naming_the_file_and_the_server_goes_on(live, name, data, words):
    response = live.post(f"/api/predict?name={name}", data=data)
    assert response.status_code == 422
    message = response.get_json()["error"]
    assert all(w in message for w in words), message
    assert live.get("/api/info").status_code == 200


def _same_as_predict(predictor, live, path: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Upload `path` and run predict's own code (process_file) on it: (the viewer's answer, predict's record)."""
    models = predict.model_info(predictor)
    expected = predict.process_file(predictor, path, tmp_path / "out" / path.stem, models)
    response = live.post(f"/api/predict?name={path.name}", data=path.read_bytes())
    assert response.status_code == 200, response.data[:500]
    body = response.get_json()
    got = body["record"]
    assert got["file"] == path.name
    assert {k: v for k, v in got.items() if k not in ("file", "outputs")} == \
        {k: v for k, v in expected.items() if k not in ("file", "outputs")}
    for kind in ("lung", "infection"):  # the mask PNGs: predict's pixels
        served = np.asarray(Image.open(io.BytesIO(live.get(body["links"][kind]).data)))
        assert np.array_equal(served, np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_{kind}.png")))
    assert json.loads(live.get(body["links"]["json"]).data) == got
    return body, expected


def test_upload_gives_predicts_record_phantom(predictor, live, tmp_path):
    path = tmp_path / "phantom.png"
    Image.fromarray(phantom(300, 280, seed=3)).save(path)
    body, expected = _same_as_predict(predictor, live, path, tmp_path)
    assert body["xray"] and set(body["links"]) == {"lung", "infection", "overlay", "json"}


@pytest.mark.shared_data
def test_upload_gives_predicts_record_val(predictor, live, shared_covidqu, tmp_path):
    path = sorted((shared_covidqu / VAL_COVID).glob("*.png"))[0]
    body, expected = _same_as_predict(predictor, live, path, tmp_path)
    assert expected["assessed"] and expected["severity"]["total"] > 0


@pytest.mark.parametrize("source", ["phantom", pytest.param("val", marks=pytest.mark.shared_data)])
def test_dicom_upload_also_gives_seg_and_sr(predictor, live, request, tmp_path, source):
    import pydicom

    if source == "val":
        png = sorted((request.getfixturevalue("shared_covidqu") / VAL_COVID).glob("*.png"))[1]
        gray = np.asarray(Image.open(png).convert("L"))
    else:
        gray = phantom(256, 240, seed=2)
    path = write_dicom(tmp_path / f"{source}.dcm", gray.astype(np.uint16) * 16)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)
    body, expected = _same_as_predict(predictor, live, path, tmp_path)
    assert body["dicom_error"] is None
    seg = pydicom.dcmread(io.BytesIO(live.get(body["links"]["seg"]).data))
    sr = pydicom.dcmread(io.BytesIO(live.get(body["links"]["sr"]).data))
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == ds.StudyInstanceUID
    assert (seg.Rows, seg.Columns) == gray.shape


def test_a_dicom_the_seg_cannot_reference_still_gets_its_prediction(predictor, live, tmp_path):
    """No Study Instance UID (helpers.write_dicom writes none): the PNG / JSON results, and the reason for no SEG."""
    path = write_dicom(tmp_path / "nostudy.dcm", phantom(128, 128).astype(np.uint16) * 16)
    body, _ = _same_as_predict(predictor, live, path, tmp_path)
    assert "seg" not in body["links"] and "StudyInstanceUID" in body["dicom_error"]


# ----------------------------------------------------------------------------------------------- command line
def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "covidseg_tf.viewer", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    assert "examples:" in out.stdout and "--folder" in out.stdout and "127.0.0.1" in out.stdout


def test_a_folder_that_is_not_a_folder_is_a_usage_error(tmp_path):
    assert viewer.main(["--folder", str(tmp_path / "missing")]) == 2


def test_a_port_in_use_is_a_usage_error_found_before_the_models_load():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        assert viewer.main(["--port", str(taken.getsockname()[1]), "--quiet"]) == 2
        assert time.monotonic() - started < 5  # no model was loaded


def test_a_model_that_cannot_be_loaded_is_a_usage_error(tmp_path):
    assert viewer.main(["--port", "0", "--quiet", "--lung-model", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_command_serves_the_page_and_stops_on_a_signal(tree, stop):
    """`python -m covidseg_tf.viewer --folder DIR --port 0`: logs its address, serves the page and the folder,
    exits 0 on Ctrl-C (SIGINT) or SIGTERM."""
    if stop == signal.SIGINT:
        skip_if_sigint_ignored()
    proc = subprocess.Popen([sys.executable, "-m", "covidseg_tf.viewer", "--folder", str(tree["root"]), "--port",
                             "0"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        port, lines, deadline = None, [], time.monotonic() + 240
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "serving on http://127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert port, "".join(lines)[-3000:]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/folder")
        body = json.loads(conn.getresponse().read())
        assert [e["record"] for e in body["entries"]][0] == "sub/b.json"
        conn.request("GET", "/")
        assert b"covidseg-tf viewer" in conn.getresponse().read()
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------- Chromium
def _driver():
    """A headless Chromium driven by selenium; skips (fails with COVIDSEG_REQUIRE_CHROMIUM set) without one."""
    required = bool(os.environ.get("COVIDSEG_REQUIRE_CHROMIUM"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and chromedriver):
        message = "headless Chromium tests need chromium, chromium-driver (apt) and selenium (pip)"
        if required:
            pytest.fail(message + ", which .ci/run installs")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,860", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(chromedriver))


@pytest.fixture
def browser_server(predictor, tmp_path):
    """The viewer with the shipped models, on a free port of 127.0.0.1, browsing a folder predict wrote."""
    folder = tmp_path / "results"
    folder.mkdir()
    app = create_app(Viewer(predictor, folder))
    server = viewer.serve(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}/", folder
    server.shutdown()


COUNT_COLOUR = """
const [r, g, b] = arguments[0];
const c = document.getElementById("overlay");
const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < px.length; i += 4) if (px[i] === r && px[i + 1] === g && px[i + 2] === b && px[i + 3] === 255) n++;
return [n, c.width, c.height];
"""


def _check_page(url: str, path: Path, expected: dict, screenshot: Path | None = None) -> None:
    """Open the page, upload `path`, wait for the result; the numbers shown are predict's, the overlay canvas
    holds exactly the mask pixels in the mask colours, the layer toggle works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver()
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 240).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-shown") == path.name
            or "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert driver.find_element(By.ID, "status").text == f"{path.name}: done"
        sev = expected["severity"]
        for side in ("left", "right", "total"):
            cell = driver.find_element(By.ID, f"sev-{side}")
            if sev[side] is None:
                assert cell.get_attribute("data-value") == "" and cell.text == "\u2013"
            else:
                assert float(cell.get_attribute("data-value")) == sev[side]
                assert cell.text == f"{sev[side]:.1f} %"
        assert driver.find_element(By.ID, "sev-grade").text == (sev["grade"] or "\u2013")
        shown = driver.find_element(By.ID, "assessed").text
        assert shown == ("assessed" if expected["assessed"] else f"not assessed: {expected['reason']}")
        h, w = expected["size"]["height"], expected["size"]["width"]
        lung_px, inf_px = expected["lung_area_px"], expected["infection_area_px"]
        lung_only, cw, ch = driver.execute_script(COUNT_COLOUR, list(predict.LUNG_RGB))
        red, _, _ = driver.execute_script(COUNT_COLOUR, list(predict.INFECTION_RGB))
        assert (cw, ch) == (w, h)
        assert red == inf_px  # drawn on top of the lungs
        assert lung_only <= lung_px and lung_only + red >= lung_px
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        driver.execute_script("const o = document.getElementById('opacity'); o.value = 80;"
                              "o.dispatchEvent(new Event('input'));")
        assert driver.find_element(By.ID, "overlay").value_of_css_property("opacity") == "0.8"
        driver.find_element(By.ID, "show-infection").click()  # infection layer off: every lung pixel green
        assert driver.execute_script(COUNT_COLOUR, list(predict.LUNG_RGB))[0] == lung_px
        assert driver.execute_script(COUNT_COLOUR, list(predict.INFECTION_RGB))[0] == 0
        driver.find_element(By.ID, "show-lung").click()
        assert driver.execute_script(COUNT_COLOUR, list(predict.LUNG_RGB))[0] == 0
        links = {a.text: a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#links a")}
        assert {"lung mask (PNG)", "infection mask (PNG)", "JSON record"} <= set(links)
    finally:
        driver.quit()


def test_chromium_upload_phantom(predictor, browser_server, tmp_path):
    """Always runs (with a browser): a synthetic chest-like phantom, whatever the gate decides about it."""
    url, _ = browser_server
    path = tmp_path / "inputs" / "phantom.png"
    path.parent.mkdir()
    Image.fromarray(phantom(320, 300, seed=5)).save(path)
    expected = predict.process_file(predictor, path, tmp_path / "out" / "phantom", predict.model_info(predictor))
    _check_page(url, path, expected)


@pytest.mark.shared_data
def test_chromium_upload_val_xray_and_browse_the_folder(predictor, browser_server, shared_covidqu, tmp_path):
    """A real Val X-ray: the page shows predict's severity, lung-coloured pixels on the overlay canvas; then the
    folder predict wrote, listed by severity, opens the record."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = browser_server
    images = sorted((shared_covidqu / VAL_COVID).glob("*.png"))[:3]
    models = predict.model_info(predictor)
    records = [predict.process_file(predictor, p, folder / p.stem, models) for p in images]
    assert records[0]["assessed"] and records[0]["lung_area_px"] > 0
    target = os.environ.get("COVIDSEG_VIEWER_SCREENSHOT")
    shot = tmp_path / "viewer.png"
    _check_page(url, images[0], records[0], screenshot=shot)
    assert shot.stat().st_size < 250_000 and Image.open(shot).size[0] >= 800
    if target:
        shutil.copyfile(shot, REPO / target if not Path(target).is_absolute() else target)

    driver = _driver()
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#list tbody tr[data-record]"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#list tbody tr[data-record]")
        totals = sorted((r["severity"]["total"] for r in records if r["assessed"]), reverse=True)
        assert [float(r.find_elements(By.TAG_NAME, "td")[3].text.split()[0]) for r in rows][:len(totals)] == \
            [round(t, 1) for t in totals]
        rows[0].click()
        first = max((r for r in records if r["assessed"]), key=lambda r: r["severity"]["total"])
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "sev-total").get_attribute("data-value") == str(first["severity"]["total"]))
        assert driver.find_element(By.ID, "layer-note").text.startswith("the X-ray is not inside the folder")
    finally:
        driver.quit()
