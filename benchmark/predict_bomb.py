"""What a decompression bomb costs ``/predict``: one good image alone, beside the same image
with a bomb in the same batch.

Starts ``boxloop serve`` as a subprocess, trains a version from webhooks (a few images, one
epoch: only so that the detector really runs), then times over HTTP, interleaved so both see
the same machine load:

* ``/predict`` with one good 640x480 image;
* ``/predict`` with that image and a PNG whose header claims 20000x20000 pixels (the bomb gets
  its own 413 in ``errors``, the good image its boxes);
* ``/predict`` with the bomb alone (its whole cost over HTTP: a header read and a 413);
* in process, ``decode_image`` of the good image and of the bomb (which stops at its header).

The load average (``os.getloadavg``) is recorded before and after. Usage:
``.venv/bin/python -m benchmark.predict_bomb [--repeats 40] [--out benchmark/results/predict_bomb.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import httpx

from benchmark.backend_speed import (
    LABEL_CONFIG,
    _annotation,
    _images,
    _load_average,
    _pct,
    server_env,
    start_server,
)


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` 8-bit grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": _pct(values, 50),
        "p95": _pct(values, 95),
        "mean": sum(values) / len(values),
        "n": len(values),
    }


def _decode_ms(data: bytes, repeats: int = 200) -> dict[str, float]:
    """In process: what ``decode_image`` costs for ``data`` (a bomb stops at its header)."""
    from backend.images import ImageError, decode_image

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with contextlib.suppress(ImageError):
            decode_image(data, max_pixels=40_000_000)
        times.append(1000 * (time.perf_counter() - started))
    return _summary(times)


def run(n_images: int, repeats: int, out: Path, detector: str = "yolox_nano") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="boxloop-bomb-"))
    dataset = _images(work / "images", n_images + 1)
    bomb = work / "images" / "bomb.png"
    bomb.write_bytes(bomb_png())
    load_before = _load_average()
    server, url = start_server(work, server_env(work, n_images, detector, epochs=1))
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.post("/setup", json={"project": 1, "schema": LABEL_CONFIG})
            for i, (path, objects) in enumerate(dataset[:n_images]):
                client.post("/webhook", json=_annotation(i, path, objects))
            version = None
            for _ in range(3000):  # training a version: minutes at most
                jobs = client.get("/status").json()["projects"][0]["training_jobs"]
                if jobs and jobs[0]["status"] in ("succeeded", "failed"):
                    if jobs[0]["status"] == "failed":
                        raise RuntimeError(f"training failed: {jobs[0]}")
                    version = jobs[0]["model_version"]
                    break
                time.sleep(0.2)
            for _ in range(100):  # the swap: /setup answers the served version
                setup = client.post("/setup", json={"project": 1, "schema": LABEL_CONFIG})
                if setup.json()["model_version"] == version:
                    break
                time.sleep(0.2)
            good = {"id": 1, "data": {"image": str(dataset[n_images][0])}}
            bad = {"id": 2, "data": {"image": str(bomb)}}
            body = {"project": 1, "label_config": LABEL_CONFIG}

            def timed(tasks: list[dict[str, Any]]) -> tuple[float, httpx.Response]:
                started = time.perf_counter()
                answer = client.post("/predict", json={**body, "tasks": tasks})
                return 1000 * (time.perf_counter() - started), answer

            for _ in range(3):  # warm-up
                timed([good])
                timed([good, bad])
            alone: list[float] = []
            with_bomb: list[float] = []
            bomb_only: list[float] = []
            for i in range(repeats):
                order = ([good], [good, bad]) if i % 2 == 0 else ([good, bad], [good])
                for tasks in order:
                    ms, answer = timed(tasks)
                    assert answer.status_code == 200, answer.text
                    result = answer.json()
                    assert result["results"][0]["model_version"] == version
                    if len(tasks) == 2:
                        assert [e["status"] for e in result["errors"]] == [413], result
                        with_bomb.append(ms)
                    else:
                        alone.append(ms)
                ms, answer = timed([bad])
                assert answer.status_code == 413, answer.text
                bomb_only.append(ms)
    finally:
        server.terminate()
        server.wait(30)
    load = {"before": load_before, "after": _load_average()}
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": load},
        "model_version": version,
        "images": {
            "good": [640, 480],
            "bomb": {"header_claims": [20_000, 20_000], "bytes": bomb.stat().st_size},
            "train_images": n_images,
        },
        "predict_ms_good_alone": _summary(alone),
        "predict_ms_good_plus_bomb": _summary(with_bomb),
        "predict_ms_bomb_alone": _summary(bomb_only),
    }
    results["decode_image_ms"] = {
        "good": _decode_ms(dataset[n_images][0].read_bytes()),
        "bomb": _decode_ms(bomb.read_bytes()),
    }
    results["bomb_cost_ms_p50"] = (
        results["predict_ms_good_plus_bomb"]["p50"] - results["predict_ms_good_alone"]["p50"]
    )
    # each repeat times both requests back to back: the median of those differences is less
    # exposed to the machine's load drifting than the difference of the two medians
    paired = sorted(b - a for a, b in zip(alone, with_bomb, strict=True))
    results["bomb_cost_ms_paired_median"] = paired[len(paired) // 2]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images the version trains on")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/predict_bomb.json"))
    args = parser.parse_args(argv)
    results = run(args.images, args.repeats, args.out)
    for key in ("predict_ms_good_alone", "predict_ms_good_plus_bomb", "predict_ms_bomb_alone"):
        row = results[key]
        print(f"{key:<28} p50 {row['p50']:7.1f}  p95 {row['p95']:7.1f}  (n={row['n']})")
    decode = results["decode_image_ms"]
    print(
        f"decode_image p50: good {decode['good']['p50']:.2f} ms, bomb {decode['bomb']['p50']:.3f} ms"
    )
    print(
        f"bomb cost: p50 difference {results['bomb_cost_ms_p50']:+.1f} ms, paired median "
        f"{results['bomb_cost_ms_paired_median']:+.1f} ms; load {results['machine']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
