"""Minimal TF Serving REST client: send chest X-rays, save the returned masks and severity.

Standard library only (urllib, json, base64), so it runs anywhere without TensorFlow. One request per image,
so one bad image never loses the others. Each IMAGE's <stem> is batch_predict's (`covidseg_tf.stems`): its path
below the images' common folder without the extension (``a/x.png`` and ``b/x.png`` -> ``a/x``, ``b/x``), with
``-<8 hex of sha256(path)>`` added when two would coincide (``x.png`` and ``x.jpg``), so no output overwrites
another. For each IMAGE it writes into --out:

    <stem>_<output>.png   every `*_bytes` output (PNG masks at the image's own size, decoded from base64),
                          e.g. <stem>_lung_mask.png, <stem>_infection_mask.png
    <stem>.json           the image's full path ("image"), the scalar and text outputs (severity_left/right/
                          total in percent, height, width; the cascade's `assessed` and `reason`: severities
                          are null for an image the input quality gate did not assess; with an image-level
                          head infection_probability, image_class, image_class_prob) and the mask files'
                          paths relative to --out

Request sent (TF Serving REST predict API, row format, binary input as {"b64": ...}):

    POST <url>/v1/models/<model>[/versions/<v>]:predict
    {"instances": [{"images": {"b64": "<base64 PNG/JPEG>"}}]}          (+ "lung_masks" for the infection model)
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidseg_tf import exitcodes
from covidseg_tf.files import path_problem
from covidseg_tf.stems import plan_stems

log = logging.getLogger(__name__)

PROG = "python -m covidseg_tf.serve_client"
DEFAULT_URL = "http://localhost:8501"
DEFAULT_SIGNATURE = "serving_default"


class ServingError(RuntimeError):
    """A request failed: connection problem, HTTP error (with the server's message) or a malformed reply."""


def predict_url(url: str, model: str, version: int | None = None) -> str:
    """`<url>/v1/models/<model>[/versions/<version>]:predict`."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    ver = f"/versions/{version}" if version is not None else ""
    return f"{base}/v1/models/{model}{ver}:predict"


def build_request(images: Sequence[bytes], lung_masks: Sequence[bytes] | None = None,
                  signature: str = DEFAULT_SIGNATURE) -> dict[str, Any]:
    """The JSON body of a row-format predict request with binary inputs `images` (and `lung_masks`)."""
    if lung_masks is not None and len(lung_masks) != len(images):
        raise ValueError(f"{len(lung_masks)} lung masks for {len(images)} images: give one mask per image")
    instances = []
    for i, data in enumerate(images):
        inst = {"images": {"b64": base64.b64encode(data).decode("ascii")}}
        if lung_masks is not None:
            inst["lung_masks"] = {"b64": base64.b64encode(lung_masks[i]).decode("ascii")}
        instances.append(inst)
    body: dict[str, Any] = {"instances": instances}
    if signature != DEFAULT_SIGNATURE:
        body["signature_name"] = signature
    return body


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """POST `body` as JSON; return the decoded reply or raise ServingError with a readable message."""
    data = json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise ServingError(f"HTTP {exc.code} {exc.reason} from {url}: {detail}") from None
    except urllib.error.URLError as exc:
        raise ServingError(f"cannot reach TF Serving at {url}: {exc.reason} (is the server running?)") from None
    except (TimeoutError, OSError) as exc:
        raise ServingError(f"request to {url} failed: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise ServingError(f"reply from {url} is not JSON: {raw[:200]!r}") from None


def output_stems(images: Sequence[Path]) -> dict[str, str]:
    """{absolute image path: output stem}: batch_predict's rule (`covidseg_tf.stems.plan_stems`) with the images'
    common folder as the prefix, so no two images share an output name."""
    paths = [os.path.abspath(p) for p in images]
    if not paths:
        return {}
    prefix = os.path.commonpath([os.path.dirname(p) for p in paths]).rstrip("/") + "/"
    return plan_stems((p, prefix) for p in paths)


def save_prediction(pred: dict[str, Any], stem: str, out_dir: Path, image: str | Path | None = None) -> dict[str, Any]:
    """Write the `*_bytes` PNGs and a JSON summary of one prediction under `out_dir`/`stem` (which may hold
    folders); return the summary (``"image"``: `image`, the input's path, else `stem`; mask paths relative to
    `out_dir`)."""
    (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"image": stem if image is None else str(image), "masks": {}}
    for key, value in sorted(pred.items()):
        if key.endswith("_bytes"):
            if not (isinstance(value, dict) and "b64" in value):
                raise ServingError(f"output {key!r} is not a {{'b64': ...}} object")
            name = key[: -len("_bytes")]
            path = out_dir / f"{stem}_{name}.png"
            path.write_bytes(base64.b64decode(value["b64"]))
            summary["masks"][name] = path.relative_to(out_dir).as_posix()
        elif isinstance(value, (int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)):
            summary[key] = value  # scalars, text, and short vectors such as the image head's image_class_prob
    if summary.get("assessed") is False:  # the quality gate refused the image: its zeros are no finding
        summary.update({k: None for k in list(summary)
                        if k.startswith("severity_") or k in ("infection_probability", "image_class",
                                                              "image_class_prob")})
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def predict_files(url: str, model: str, images: Sequence[Path], out_dir: Path,
                  lung_masks: Sequence[Path] | None = None, version: int | None = None,
                  signature: str = DEFAULT_SIGNATURE, timeout: float = 60.0) -> tuple[list[dict], list[str]]:
    """One request per image; returns (summaries of the successes, error messages naming the failed files)."""
    endpoint = predict_url(url, model, version)
    stems = output_stems(images)
    done, errors = [], []
    for i, image in enumerate(images):
        try:
            problem = path_problem(image)  # a FIFO would block read_bytes forever, a dangling link says "no file"
            if problem:
                raise ValueError(problem)
            data = Path(image).read_bytes()
            mask = [Path(lung_masks[i]).read_bytes()] if lung_masks else None
            reply = post_json(endpoint, build_request([data], mask, signature), timeout)
            preds = reply.get("predictions")
            if not isinstance(preds, list) or len(preds) != 1 or not isinstance(preds[0], dict):
                raise ServingError(f"unexpected reply (no 'predictions' list of one object): {str(reply)[:200]}")
            path = os.path.abspath(image)
            done.append(save_prediction(preds[0], stems[path], out_dir, image=path))
        except (OSError, ServingError, ValueError) as exc:
            errors.append(f"{image}: {exc}")
            log.error("%s: %s", image, exc)
            if isinstance(exc, ServingError) and "cannot reach" in str(exc):
                errors.extend(f"{rest}: skipped (server unreachable)" for rest in images[i + 1:])
                break
    return done, errors


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Send chest X-ray images (PNG/JPEG) to TF Serving's REST API and save the returned masks "
        "(<stem>_<output>.png) and severity (<stem>.json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m covidseg_tf.serve_client --url http://localhost:8501 --model cascade xray1.png xray2.jpg\n"
        "  python -m covidseg_tf.serve_client --model lung --out masks/ xray.png\n"
        "  python -m covidseg_tf.serve_client --model infection --lung-masks lung.png -- xray.png\n"
        "server: docker run -p 8501:8501 -v $PWD/saved_models:/models tensorflow/serving "
        "--model_config_file=/models/models.config\n"
        "an image that cannot be read or that the server refuses is named in an error (exit 1, the others are "
        "sent);\nan unreachable server fails the rest.\n" + exitcodes.EPILOG,
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--url", default=DEFAULT_URL, help=f"TF Serving REST address (default: {DEFAULT_URL})")
    p.add_argument("--model", default="cascade", help="model name: cascade, lung or infection (default: cascade)")
    p.add_argument("--version", type=int, default=None, help="model version (default: the latest)")
    p.add_argument("--signature", default=DEFAULT_SIGNATURE, help=f"signature (default: {DEFAULT_SIGNATURE})")
    p.add_argument("--lung-masks", nargs="+", type=Path, default=None, metavar="MASK",
                   help="infection model only: one lung mask PNG per image, same order")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    args = p.parse_args(argv)
    if args.lung_masks is not None and len(args.lung_masks) != len(args.images):
        p.error(f"--lung-masks: {len(args.lung_masks)} masks for {len(args.images)} images")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    done, errors = predict_files(args.url, args.model, args.images, args.out, args.lung_masks, args.version,
                                 args.signature, args.timeout)
    for s in done:
        if s.get("assessed") is False:
            log.warning("%s: not assessed (input quality gate): %s", s["image"], s.get("reason", ""))
            continue
        sev = ", ".join(f"{k[len('severity_'):]} {s[k]:.1f}%" for k in ("severity_right", "severity_left",
                                                                        "severity_total") if k in s)
        log.info("%s -> %s%s", s["image"], ", ".join(s["masks"].values()), f" (severity {sev})" if sev else "")
    if errors:
        log.error("%d of %d image(s) failed", len(errors), len(args.images))
        return exitcodes.FAILED
    return exitcodes.OK


if __name__ == "__main__":
    exitcodes.run_cli(main, PROG, "each image's outputs are written when its reply arrives; rerun for the rest")
