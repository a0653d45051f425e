"""A local browser viewer: open X-ray files, or browse a predict / batch_predict output folder.

    python -m covidseg_tf.viewer                                   # the shipped models, http://127.0.0.1:8765/
    python -m covidseg_tf.viewer --folder preds                    # also browse predict's (or batch_predict's) outputs

The page (static files in ``covidseg_tf/viewer_static/``: plain JavaScript and a canvas, nothing from the network)
shows an X-ray with its lung and infection masks as overlays (each can be switched off; one opacity slider), the
severity per lung and in total with its grade, the input gate's "not assessed" reason, the models that made it,
and links to the masks, the JSON record, the overlay and (for a DICOM input) the DICOM SEG and SR.

Opening a file (upload)
    The bytes go through predict's own steps: `imageio.decode_image` (the size limits of `covidseg_tf.limits`,
    checked from the header before decoding), `inference.Predictor.predict`, then `predict.render_outputs` for the
    JSON record and the mask / overlay PNGs, so the page shows predict's numbers. A DICOM upload also gets its SEG
    and SR (`render_outputs` as for `predict --dicom`). Results are kept in memory (the last `KEEP_RESULTS`),
    never written to disk.
    A request larger than `MAX_UPLOAD_BYTES` is refused (413) before it is read; a file that does not decode, or
    declares more pixels than the limits allow, is refused (422); each error names the file, and the server goes on.

Browsing a folder (--folder)
    Every predict JSON record below the folder (predict's ``<stem>.json``, batch_predict's ``images/<stem>.json``)
    is listed with its severities (`folder_entries`, sortable by any of them: `sort_entries`); its sibling outputs
    (`predict.OUTPUT_SUFFIXES`, `dicom.DICOM_SUFFIXES`) are linked. The X-ray itself is shown when the file the record
    names lies inside the folder and still has the recorded SHA-256; otherwise the page shows predict's overlay PNG
    (its layers drawn in).

Security
    The server listens on 127.0.0.1 unless --host says otherwise, and then only answers requests addressed to
    127.0.0.1 or localhost (Flask's TRUSTED_HOSTS: a web page elsewhere cannot reach it through DNS rebinding).
    Only files inside --folder are served (`confined`): a path with ``..``, an absolute path, or a symbolic link
    resolving outside the folder is answered 404, whatever its URL encoding. There is no authentication: --host
    0.0.0.0 shows the folder and the models to everyone who can reach the port.
"""

from __future__ import annotations

import argparse
import collections
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from covidseg_tf import exitcodes
from covidseg_tf.cli import add_decision_flags, add_model_flags, decision_overrides
from covidseg_tf.limits import MAX_INFLATED_BYTES, MAX_SIDE

if TYPE_CHECKING:
    import flask

    from covidseg_tf.inference import Predictor

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "viewer_static"
DEFAULT_PORT = 8765
MAX_UPLOAD_BYTES = MAX_INFLATED_BYTES
"""Largest upload (bytes): an uncompressed image of the largest size the limits decode, at 8 bytes a pixel (16-bit
RGBA), fits; a larger file cannot be an image the decoder would accept."""
MAX_RECORD_BYTES = 1 << 20
"""JSON files larger than this are not read as records when listing a folder (predict's are about 2 kB)."""
KEEP_RESULTS = 32
"""Uploads whose results stay in memory (the oldest go first)."""
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
SORT_KEYS = ("name", "left", "right", "total", "infection_probability")


class Outside(LookupError):
    """A path that is not a file inside the chosen folder (answered 404: the page learns nothing about it)."""


def confined(root: Path, rel: str) -> Path:
    """The regular file `rel` names inside `root`, resolved; `rel` is relative, '/'-separated, as a decoded URL
    gives it. Raises `Outside` for an empty, absolute or back-slashed path, one with ``..`` / ``.`` / empty parts
    or a NUL, a missing file, a folder, or a file whose real path (symbolic links followed) is not below `root`."""
    if not rel or "\0" in rel or "\\" in rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise Outside(rel)
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise Outside(rel)
    real_root = root.resolve()
    try:
        path = (real_root / rel).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, a link loop
        raise Outside(rel) from e
    if real_root not in path.parents or not path.is_file():
        raise Outside(rel)
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    """The predict JSON record in `path` (a dict with "file", "assessed", "severity"), or None for any other file."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("severity"), dict):
        return None
    return record if {"file", "assessed"} <= record.keys() else None


def _number(value: Any) -> float | None:
    """A record's figure if it is one (a hand-edited record may hold anything), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def entry_of(rel: str, record: dict[str, Any]) -> dict[str, Any]:
    """One row of the folder list: the record's path (relative to the folder), its input and its severities
    (None where the record has no number)."""
    sev, image_level = record["severity"], record.get("image_level")
    image_level = image_level if isinstance(image_level, dict) else {}
    return {"record": rel, "file": str(record["file"]), "assessed": bool(record["assessed"]),
            "reason": None if record.get("reason") is None else str(record["reason"]),
            "left": _number(sev.get("left")), "right": _number(sev.get("right")), "total": _number(sev.get("total")),
            "grade": None if sev.get("grade") is None else str(sev["grade"]),
            "infection_probability": _number(image_level.get("infection_probability"))}


def folder_entries(root: Path) -> list[dict[str, Any]]:
    """The predict records below `root` (`entry_of` each), in path order. Symbolic links to folders are not
    followed; a JSON file that resolves outside `root`, or is not a predict record, is left out."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".json"):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            try:
                record = read_record(confined(root, rel))
            except Outside:
                continue
            if record is not None:
                entries.append(entry_of(rel, record))
    return sorted(entries, key=lambda e: e["record"])


def sort_entries(entries: list[dict[str, Any]], key: str = "total", descending: bool = True) -> list[dict[str, Any]]:
    """`entries` sorted by `key` (one of SORT_KEYS; "name" is the record's path); rows without a value (not
    assessed, no image-level head) come last in either order, by path."""
    if key not in SORT_KEYS:
        raise ValueError(f"sort: expected one of {', '.join(SORT_KEYS)}, got {key!r}")
    field = "record" if key == "name" else key
    known = [e for e in entries if e[field] is not None]
    unknown = sorted((e for e in entries if e[field] is None), key=lambda e: e["record"])
    return sorted(known, key=lambda e: (e[field], e["record"]), reverse=descending) + unknown


def _png(gray: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _display_name(name: str | None) -> str:
    """An upload's name as shown and recorded: its last path part, at most 200 characters."""
    base = re.split(r"[/\\]", name or "")[-1].strip()[:200]
    return base or "upload"


class Results:
    """The outputs of the last `keep` uploads, in memory: {result id: {file name: bytes}}."""

    def __init__(self, keep: int = KEEP_RESULTS):
        self.keep = keep
        self._items: collections.OrderedDict[str, dict[str, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        """A fresh result id (random: one upload's results cannot be guessed from another's)."""
        return secrets.token_hex(8)

    def put(self, rid: str, files: dict[str, bytes]) -> None:
        with self._lock:
            self._items[rid] = files
            while len(self._items) > self.keep:
                self._items.popitem(last=False)

    def get(self, rid: str, name: str) -> bytes | None:
        with self._lock:
            return self._items.get(rid, {}).get(name)


class Viewer:
    """What the pages are served from: the predictor (None: uploads are refused, 503), its `predict.model_info`,
    the folder to browse (None: no folder) and the uploads' results."""

    def __init__(self, predictor: Predictor | None, folder: Path | None = None):
        self.predictor: Predictor | None = None
        self.models: dict[str, Any] | None = None
        if predictor is not None:
            self.use(predictor)
        self.folder = folder.resolve() if folder is not None else None
        self.results = Results()
        self._lock = threading.Lock()  # one prediction at a time (the CPU is the limit anyway)

    def use(self, predictor: Predictor) -> None:
        """Serve uploads with `predictor` (its `predict.model_info` goes into every record)."""
        from covidseg_tf.predict import model_info

        self.models = model_info(predictor)
        self.predictor = predictor

    def upload(self, data: bytes, name: str) -> dict[str, Any]:
        """Predict one uploaded file as predict does; returns {"record", "links", "xray"}. Raises
        `imageio.XRayReadError` (naming `name`) for a file that cannot be decoded or is above the limits."""
        from covidseg_tf.files import sha256_bytes
        from covidseg_tf.imageio import decode_image
        from covidseg_tf.predict import render_outputs

        assert self.predictor is not None and self.models is not None
        image = decode_image(data, name)
        with self._lock:
            pred = self.predictor.predict([image.gray], colour=[image.colour])[0]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem) or "upload"
        rid = self.results.new_id()
        prefix = f"/results/{rid}/"
        def render(dicom: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
            return render_outputs(name, image.gray, pred, prefix + stem, self.models, sha256=sha256_bytes(data),
                                  dicom=dicom)

        dicom_error = None
        try:  # a DICOM upload also gets its SEG and SR (image.dicom: its header; None for other formats)
            record, encoded = render(image.dicom)
        except Exception as e:  # the PNG / JSON results stand without them; say why
            log.warning("%s: no DICOM SEG / SR: %s", name, e)
            dicom_error = str(e)
            record, encoded = render(None)
        files = {url[len(prefix):]: body for url, body in encoded.items()}
        files["xray.png"] = _png(image.gray)
        self.results.put(rid, files)
        links = {kind: prefix + quote(stem + suffix) for kind, suffix in _suffixes().items()
                 if stem + suffix in files}
        log.info("%s: %s", name, f"severity {record['severity']['total']:.1f}% ({record['severity']['grade']})"
                 if record["assessed"] else f"not assessed: {record['reason']}")
        return {"record": record, "links": links, "xray": prefix + "xray.png", "dicom_error": dicom_error}

    def record(self, rel: str) -> dict[str, Any]:
        """A folder record (`rel`: its path relative to the folder) with links to its sibling outputs and, when
        `source_of` finds it, its X-ray. Raises `Outside`."""
        if self.folder is None:
            raise Outside(rel)
        record = read_record(confined(self.folder, rel)) if rel.endswith(".json") else None
        if record is None:
            raise Outside(rel)
        stem = rel[:-len(".json")]
        links = {}
        for kind, suffix in _suffixes().items():
            try:
                confined(self.folder, stem + suffix)
            except Outside:
                continue
            links[kind] = "/files/" + quote(stem + suffix)
        xray = "/xray/" + quote(rel) if self.source_of(rel, record) is not None else None
        return {"record": record, "links": links, "xray": xray}

    def source_of(self, rel: str, record: dict[str, Any]) -> Path | None:
        """The X-ray file a folder record names, if it lies inside the folder and has the recorded SHA-256: the
        record's "file" as an absolute path, or relative to the folder, to the record's folder or to the server's
        working directory."""
        from covidseg_tf.files import sha256_file

        assert self.folder is not None
        given = Path(str(record.get("file", "")))
        candidates = [given] if given.is_absolute() else [
            self.folder / given, (self.folder / rel).parent / given, Path.cwd() / given]
        for candidate in candidates:
            try:
                path = confined(self.folder, candidate.resolve().relative_to(self.folder).as_posix())
            except (Outside, ValueError, OSError):
                continue
            if record.get("input_sha256") in (None, sha256_file(path)):
                return path
        return None


def _suffixes() -> dict[str, str]:
    """{link kind: file name ending} of the outputs a record may have beside it."""
    from covidseg_tf.dicom import SEG_SUFFIX, SR_SUFFIX
    from covidseg_tf.predict import OUTPUT_SUFFIXES

    return {**dict(zip(("lung", "infection", "overlay", "json"), OUTPUT_SUFFIXES)), "seg": SEG_SUFFIX,
            "sr": SR_SUFFIX}


def is_loopback(host: str) -> bool:
    """True for 127.x.y.z, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(viewer: Viewer, loopback: bool = True) -> flask.Flask:
    """The Flask application serving `viewer` (see the module docstring). With `loopback` it answers only
    requests addressed to 127.0.0.1 or localhost."""
    import flask
    from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge

    from covidseg_tf.imageio import XRayReadError, decode_image
    from covidseg_tf.report import INFECTION_RGB, LUNG_RGB

    app = flask.Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES, TRUSTED_HOSTS=list(LOOPBACK_NAMES) if loopback else None,
                      JSON_SORT_KEYS=False)

    def error(status: int, message: str) -> flask.Response:
        response = flask.jsonify(error=message)
        response.status_code = status
        return response

    @app.after_request
    def headers(response: flask.Response) -> flask.Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e: RequestEntityTooLarge) -> flask.Response:
        name = _display_name(flask.request.args.get("name"))
        return error(413, f"{name}: the upload is larger than {MAX_UPLOAD_BYTES} bytes (the largest image the "
                          f"decoder accepts, {MAX_SIDE} px a side, fits in less)")

    @app.errorhandler(Outside)
    def outside(e: Outside) -> flask.Response:  # says nothing about what lies outside the folder
        return error(404, NotFound.description)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> flask.Response:
        return error(e.code or 500, e.description or e.name)

    @app.get("/")
    def index() -> flask.Response:
        return flask.send_from_directory(STATIC, "index.html")

    @app.get("/api/info")
    def info() -> flask.Response:
        return flask.jsonify(folder=None if viewer.folder is None else viewer.folder.name, models=viewer.models,
                             colours={"lung": LUNG_RGB, "infection": INFECTION_RGB},
                             max_upload_bytes=MAX_UPLOAD_BYTES, max_side=MAX_SIDE)

    @app.get("/api/folder")
    def folder() -> flask.Response:
        if viewer.folder is None:
            return error(404, "no folder: start the viewer with --folder DIR")
        try:
            entries = sort_entries(folder_entries(viewer.folder), flask.request.args.get("sort", "total"),
                                   flask.request.args.get("order", "desc") != "asc")
        except ValueError as e:
            return error(400, str(e))
        return flask.jsonify(folder=viewer.folder.name, entries=entries)

    @app.get("/api/record/<path:rel>")
    def record(rel: str) -> flask.Response:
        try:
            return flask.jsonify(viewer.record(rel))
        except Outside:
            raise NotFound() from None

    @app.get("/files/<path:rel>")
    def files(rel: str) -> flask.Response:
        if viewer.folder is None:
            raise NotFound()
        try:
            path = confined(viewer.folder, rel)
        except Outside:
            raise NotFound() from None
        return flask.send_file(path, as_attachment=path.suffix.lower() == ".dcm")

    @app.get("/xray/<path:rel>")
    def xray(rel: str) -> flask.Response:
        record = read_record(confined(viewer.folder, rel)) if viewer.folder and rel.endswith(".json") else None
        source = viewer.source_of(rel, record) if record is not None else None
        if source is None:
            raise NotFound()
        try:
            gray = decode_image(source.read_bytes(), rel).gray
        except (OSError, XRayReadError) as e:
            return error(422, str(e))
        return flask.send_file(io.BytesIO(_png(gray)), mimetype="image/png")

    @app.post("/api/predict")
    def upload() -> flask.Response:
        name = _display_name(flask.request.args.get("name"))
        if viewer.predictor is None:
            return error(503, f"{name}: no models are loaded")
        data = flask.request.get_data(cache=False)  # raises RequestEntityTooLarge above MAX_CONTENT_LENGTH
        try:
            return flask.jsonify(viewer.upload(data, name))
        except XRayReadError as e:
            log.warning("upload refused: %s", e)
            return error(422, str(e))

    @app.get("/results/<rid>/<name>")
    def result(rid: str, name: str) -> flask.Response:
        body = viewer.results.get(rid, name)
        if body is None:
            raise NotFound()
        mimetype = {".png": "image/png", ".json": "application/json", ".dcm": "application/dicom"}.get(
            Path(name).suffix, "application/octet-stream")
        return flask.send_file(io.BytesIO(body), mimetype=mimetype, download_name=name,
                               as_attachment=name.endswith(".dcm"))

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.viewer",
        description="A local web page to look at predictions: open X-ray files (PNG/JPEG/DICOM...) or browse a "
                    "predict / batch_predict output folder; lung and infection overlays, severity per lung, grade.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m covidseg_tf.viewer                         # shipped models, http://127.0.0.1:8765/\n"
               "  python -m covidseg_tf.viewer --folder preds --port 8000   # browse predict --out preds\n"
               "  python -m covidseg_tf.viewer --lung-model runs/lung/model.keras \\\n"
               "      --infection-model runs/infection/model.keras\n"
               "only files inside --folder are served; the page loads nothing from the network.\n"
               "--host other than 127.0.0.1 / localhost exposes the page (no authentication) to the network.\n"
               "exit codes: 0 stopped (Ctrl-C or SIGTERM); 2 usage error (a --folder that is not a folder, a port "
               "in use, a model that cannot be loaded).")
    add_model_flags(p)
    add_decision_flags(p)
    p.add_argument("--folder", type=Path, default=None,
                   help="a predict --out or batch_predict --output folder to browse (nothing outside it is served)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                        "only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    return p


def serve(app: flask.Flask, host: str, port: int) -> Any:
    """A threaded werkzeug server for `app` on host:port (not started: call `serve_forever`, `shutdown`);
    `server.port` is the port it listens on (port 0 picks a free one)."""
    from werkzeug.serving import make_server

    return make_server(host, port, app, threaded=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.folder is not None and not args.folder.is_dir():
        log.error("--folder %s: not a folder", args.folder)
        return exitcodes.USAGE
    loopback = is_loopback(args.host)
    if not loopback:
        log.warning("listening on %s: anyone who can reach this address sees the page%s (no authentication)",
                    args.host, f" and {args.folder}" if args.folder else "")
    viewer = Viewer(None, args.folder)
    try:  # the port first: a port in use is found before the models load
        # (an IPv6 loopback address keeps no Host check: werkzeug cannot match "[::1]:port" against a list)
        server = serve(create_app(viewer, loopback=loopback and ":" not in args.host), args.host, args.port)
    except (OSError, SystemExit) as e:  # werkzeug reports a port in use on stderr and exits 1
        log.error("cannot listen on %s:%d%s", args.host, args.port, f": {e}" if isinstance(e, OSError) else "")
        return exitcodes.USAGE
    from covidseg_tf.inference import Predictor

    try:
        viewer.use(Predictor.load(args.lung_model, args.infection_model, image_size=args.image_size,
                                  **decision_overrides(args)))
    except (ValueError, FileNotFoundError, ImportError) as e:
        log.error("%s", e)
        server.server_close()
        return exitcodes.USAGE
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    log.info("serving on http://%s:%d/ (Ctrl-C stops)", shown, server.port)

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (kill, a service manager) stops it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
    return exitcodes.OK


if __name__ == "__main__":
    exitcodes.run_cli(main, "python -m covidseg_tf.viewer")
