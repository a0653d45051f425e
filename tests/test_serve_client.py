"""The REST client against a tiny local stand-in of TF Serving (http.server on 127.0.0.1, in a thread).

The stand-in checks requests the way TF Serving's JSON parser does for our signatures (row format,
"instances" = list of objects keyed by the signature's input names, binary values as {"b64": ...}) and
answers in TF Serving's format ({"predictions": [...]}, `_bytes` outputs as {"b64": ...}, errors as
{"error": ...} with an HTTP error status).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from covidseg_tf import serve_client

REPO = Path(__file__).resolve().parents[1]
INPUTS = {"cascade": {"images"}, "lung": {"images"}, "infection": {"images", "lung_masks"}}


def png_bytes(h: int, w: int, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


class FakeServing(BaseHTTPRequestHandler):
    requests: list[tuple[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServing.requests.append((self.path, body))
        prefix, _, verb = self.path.partition(":")
        parts = prefix.split("/")  # ['', 'v1', 'models', name, ('versions', N)]
        if verb != "predict" or parts[:3] != ["", "v1", "models"] or len(parts) not in (4, 6):
            return self.reply(404, {"error": f"Malformed request: POST {self.path}"})
        name = parts[3]
        if name not in INPUTS:
            return self.reply(404, {"error": f"Servable not found for request: Latest({name})"})
        instances = body.get("instances")
        if not isinstance(instances, list) or "inputs" in body:
            return self.reply(400, {"error": "Missing 'instances' key"})
        preds = []
        for i, inst in enumerate(instances):
            if set(inst) != INPUTS[name]:
                return self.reply(400, {"error": f"instance {i} keys {sorted(inst)} != inputs {sorted(INPUTS[name])}"})
            data = base64.b64decode(inst["images"]["b64"], validate=True)
            if not data.startswith((b"\x89PNG", b"\xff\xd8\xff")):
                return self.reply(400, {"error": f"assertion failed: [images[{i}] is not a PNG or JPEG image "
                                                 f"({len(data)} bytes)]\n\t [[{{node map/while/Assert/Assert}}]]"})
            h, w = Image.open(io.BytesIO(data)).size[::-1]
            preds.append({  # the compact serving_default reply: base64 PNG masks and numbers only
                "lung_mask_bytes": b64(png_bytes(h, w, 255)), "infection_mask_bytes": b64(png_bytes(h, w, 0)),
                "severity_left": 12.5, "severity_right": 0.0, "severity_total": 6.25, "height": h, "width": w,
            })
        self.reply(200, {"predictions": preds})


@pytest.fixture()
def server():
    FakeServing.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServing)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_body_is_tf_serving_row_format():
    body = serve_client.build_request([b"\x89PNG-one", b"\xff\xd8\xff-two"])
    assert body == {"instances": [{"images": {"b64": base64.b64encode(b"\x89PNG-one").decode()}},
                                  {"images": {"b64": base64.b64encode(b"\xff\xd8\xff-two").decode()}}]}
    body = serve_client.build_request([b"img"], [b"mask"], signature="other")
    assert body["signature_name"] == "other"
    assert body["instances"] == [{"images": b64(b"img"), "lung_masks": b64(b"mask")}]
    with pytest.raises(ValueError, match="one mask per image"):
        serve_client.build_request([b"a", b"b"], [b"m"])


def test_predict_url():
    assert serve_client.predict_url("http://h:8501/", "cascade") == "http://h:8501/v1/models/cascade:predict"
    assert serve_client.predict_url("h:8501", "lung", 3) == "http://h:8501/v1/models/lung/versions/3:predict"


def test_client_writes_masks_and_severity(server, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(png_bytes(30, 40, 100))
    b.write_bytes(png_bytes(20, 10, 50))
    out = tmp_path / "out"
    assert serve_client.main(["--url", server, "--model", "cascade", "--out", str(out), str(a), str(b)]) == 0
    assert [p for p, _ in FakeServing.requests] == ["/v1/models/cascade:predict"] * 2
    assert FakeServing.requests[0][1] == serve_client.build_request([a.read_bytes()])
    summary = json.loads((out / "a.json").read_text())
    assert summary["severity_total"] == 6.25 and summary["height"] == 30 and summary["width"] == 40
    assert summary["masks"] == {"lung_mask": "a_lung_mask.png", "infection_mask": "a_infection_mask.png"}
    assert set(summary) == {"image", "masks", "severity_left", "severity_right", "severity_total", "height", "width"}
    lung = np.asarray(Image.open(out / "a_lung_mask.png"))
    assert lung.shape == (30, 40) and (lung == 255).all()
    assert np.asarray(Image.open(out / "b_infection_mask.png")).shape == (20, 10)


def test_dense_outputs_of_older_servables_are_ignored(tmp_path):
    """Servables exported before serving_default became compact also returned dense maps as nested lists:
    the client still saves the masks and scalars and skips those lists."""
    pred = {"lung_prob": [[[0.9]]], "lung_mask": [[[1.0]]], "lung_mask_bytes": b64(png_bytes(3, 4, 255)),
            "height": 3, "width": 4}
    summary = serve_client.save_prediction(pred, "old", tmp_path)
    assert summary == {"image": "old", "masks": {"lung_mask": "old_lung_mask.png"}, "height": 3, "width": 4}
    assert json.loads((tmp_path / "old.json").read_text()) == summary
    assert np.asarray(Image.open(tmp_path / "old_lung_mask.png")).shape == (3, 4)


def test_not_assessed_image_gets_null_severities(tmp_path):
    """The cascade's quality gate: `assessed` false and its `reason` are kept, the zero severities become null
    (no finding)."""
    pred = {"lung_mask_bytes": b64(png_bytes(2, 2, 0)), "severity_left": 0.0, "severity_right": 0.0,
            "severity_total": 0.0, "height": 2, "width": 2, "assessed": False,
            "reason": "too small: 2x2 pixels (height x width); each side must be >= 32"}
    summary = serve_client.save_prediction(pred, "tiny", tmp_path)
    assert summary["assessed"] is False and summary["reason"].startswith("too small")
    assert summary["severity_total"] is None and summary["severity_left"] is None
    assert json.loads((tmp_path / "tiny.json").read_text()) == summary


def test_client_infection_model_sends_lung_masks(server, tmp_path):
    img, mask = tmp_path / "x.png", tmp_path / "x_lung.png"
    img.write_bytes(png_bytes(8, 8))
    mask.write_bytes(png_bytes(8, 8, 255))
    code = serve_client.main(["--url", server, "--model", "infection", "--version", "2", "--lung-masks", str(mask),
                              "--out", str(tmp_path / "o"), "--", str(img)])
    assert code == 0
    path, body = FakeServing.requests[0]
    assert path == "/v1/models/infection/versions/2:predict"
    assert body["instances"][0]["lung_masks"] == b64(mask.read_bytes())


def test_server_error_message_is_shown_and_other_images_still_run(server, tmp_path, caplog):
    bad, good = tmp_path / "bad.png", tmp_path / "good.png"
    bad.write_bytes(b"not an image at all")
    good.write_bytes(png_bytes(5, 5))
    code = serve_client.main(["--url", server, "--out", str(tmp_path / "o"), str(bad), str(good)])
    assert code == 1
    assert "HTTP 400" in caplog.text and "images[0] is not a PNG or JPEG image" in caplog.text
    assert "bad.png" in caplog.text
    assert (tmp_path / "o" / "good.json").is_file() and not (tmp_path / "o" / "bad.json").exists()


def test_unknown_model_404(server, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(5, 5))
    done, errors = serve_client.predict_files(server, "nope", [img], tmp_path / "o", timeout=10)
    assert not done and len(errors) == 1
    assert "HTTP 404" in errors[0] and "Servable not found for request: Latest(nope)" in errors[0]


def test_connection_refused_is_a_clear_error(tmp_path):
    imgs = [tmp_path / "x.png", tmp_path / "y.png"]
    for p in imgs:
        p.write_bytes(png_bytes(5, 5))
    done, errors = serve_client.predict_files(f"http://127.0.0.1:{free_port()}", "cascade", imgs, tmp_path / "o",
                                              timeout=5)
    assert not done
    assert "cannot reach TF Serving" in errors[0] and "is the server running" in errors[0]
    assert "skipped (server unreachable)" in errors[1]


def test_missing_image_file_names_the_file(server, tmp_path):
    done, errors = serve_client.predict_files(server, "cascade", [tmp_path / "missing.png"], tmp_path / "o")
    assert not done and "missing.png" in errors[0] and not FakeServing.requests


def test_fifo_and_dangling_link_are_named_not_waited_on(server, tmp_path, caplog):
    """Issue 23: a FIFO named .png blocked the client forever in read_bytes; it and a dangling link are now errors
    naming them (exit 1), and the good image is still sent."""
    import os

    fifo, dangling, good = tmp_path / "pipe.png", tmp_path / "gone.png", tmp_path / "good.png"
    os.mkfifo(fifo)
    dangling.symlink_to(tmp_path / "nowhere.png")
    good.write_bytes(png_bytes(5, 5))
    code = serve_client.main(["--url", server, "--out", str(tmp_path / "o"), str(fifo), str(dangling), str(good)])
    assert code == 1
    assert f"{fifo}: not a regular file (a FIFO)" in caplog.text
    assert f"{dangling}: a dangling symbolic link" in caplog.text
    assert (tmp_path / "o" / "good.json").is_file()


def test_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "covidseg_tf.serve_client", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0
    assert "--url http://localhost:8501 --model cascade" in proc.stdout and "--out" in proc.stdout


def test_client_does_not_import_tensorflow():
    code = ("import sys, covidseg_tf.serve_client; "
            "sys.exit(1 if any(m.split('.')[0] in ('tensorflow', 'keras', 'numpy') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_inputs_with_the_same_stem_get_their_own_outputs(server, tmp_path):
    """Issue 23: a/x.png, b/x.png and x.jpg all became one x.json (the others silently overwritten), recording
    only "image": "x". Outputs now follow batch_predict's stems (the path below the inputs' common folder, a hash
    on a clash) and each JSON records its input's full path."""
    imgs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x.jpg", tmp_path / "x.png"]
    for i, p in enumerate(imgs):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(png_bytes(5 + i, 5))
    out = tmp_path / "o"
    assert serve_client.main(["--url", server, "--out", str(out), *map(str, imgs)]) == 0
    jsons = sorted(out.rglob("*.json"))
    assert len(jsons) == 4
    summaries = {json.loads(p.read_text())["image"]: (p, json.loads(p.read_text())) for p in jsons}
    assert set(summaries) == {str(p) for p in imgs}
    for img in imgs:
        path, summary = summaries[str(img)]
        assert summary["height"] == imgs.index(img) + 5  # each JSON is its own image's
        for mask in summary["masks"].values():
            assert (out / mask).is_file()
    assert summaries[str(imgs[0])][0] == out / "a" / "x.json"
    from covidseg_tf.stems import uri_hash
    assert summaries[str(imgs[2])][0] == out / f"x-{uri_hash(str(imgs[2]))}.json"
