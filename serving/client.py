"""Query the scene-classification endpoint for images or whole directories.

    python serving/client.py photo.jpg other.png                 # top-5 per image
    python serving/client.py ~/photos --concurrency 16 --top-k 1  # a directory: + throughput summary
    python serving/client.py photo.jpg --url http://gpu-node:8000 --json
    python serving/client.py ~/photos --per-request 16   # 16 images per request (multipart)

For a directory (searched recursively for .jpg/.jpeg/.png/.webp/.bmp/.tif) it also prints
images/s, p50/p99 latency per request and the error count. Exit code 1 if any image failed.
With --per-request N, images go N to a request as repeated multipart `file` fields (the endpoint
answers one result per file, in order): fewer requests, fewer round trips, one forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="endpoint base URL (default: %(default)s)")
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        help="requests in flight at once (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        help="classes per image (default: the endpoint's, 5 or all classes if fewer)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    p.add_argument(
        "--per-request",
        type=positive_int,
        default=1,
        help="images per request (default: %(default)s: the raw image as the body)",
    )
    p.add_argument(
        "--api-key-env",
        default="PLACESNET_API_KEY",
        metavar="NAME",
        help="send Authorization: Bearer $NAME when that variable is set, for an "
        "endpoint started with api_key_env/api_key_file (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document with every answer")
    return p.parse_args(argv)


def collect(paths: list[str]) -> tuple[list[Path], bool]:
    """Files to send, and whether any argument was a directory."""
    files, any_dir = [], False
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            any_dir = True
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"client.py: error: no such file or directory: {raw}")
    if not files:
        raise SystemExit("client.py: error: no images found")
    return files, any_dir


async def query_all(
    files: list[Path],
    url: str,
    top_k: int | None,
    concurrency: int,
    timeout: float,
    per_request: int = 1,
    api_key: str | None = None,
):
    """One result per image (in order) and the wall time. Each result has the request's status
    and latency; a request of several images gives each its own predictions or error."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    params = {"top_k": top_k} if top_k else {}

    def ctype(path: Path) -> str:
        return mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    async def one(client: httpx.AsyncClient, group: list[Path]) -> list[dict]:
        async with gate:
            start = time.perf_counter()
            try:
                if len(group) == 1 and per_request == 1:
                    r = await client.post(
                        f"{url}/predict",
                        params=params,
                        content=group[0].read_bytes(),
                        headers={"Content-Type": ctype(group[0])},
                    )
                else:
                    parts = [("file", (p.name, p.read_bytes(), ctype(p))) for p in group]
                    r = await client.post(f"{url}/predict", params=params, files=parts)
                latency = time.perf_counter() - start
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                if r.status_code != 200:
                    return [
                        {
                            "image": str(p),
                            "status": r.status_code,
                            "latency_s": latency,
                            "error": body.get("error") or r.text[:200],
                        }
                        for p in group
                    ]
                answers = body["results"] if "results" in body else [body]
                return [
                    {
                        "image": str(p),
                        "latency_s": latency,
                        "note": body.get("note"),
                        **(
                            {"status": 200, "predictions": a["predictions"]}
                            if "predictions" in a
                            else {"status": a.get("status", 400), "error": a.get("error")}
                        ),
                    }
                    for p, a in zip(group, answers)
                ]
            except (httpx.HTTPError, OSError) as e:
                return [
                    {
                        "image": str(p),
                        "status": None,
                        "latency_s": time.perf_counter() - start,
                        "error": f"{type(e).__name__}: {e}",
                    }
                    for p in group
                ]

    groups = [files[i : i + per_request] for i in range(0, len(files), per_request)]
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(client, g) for g in groups))
        return [r for group in answers for r in group], time.perf_counter() - start


def summary(results: list[dict], wall: float, per_request: int = 1) -> dict:
    ok = sorted(r["latency_s"] for r in results[::per_request] if r["status"] == 200)  # per request

    def pct(q):
        return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))] * 1000 if ok else float("nan")

    failed = sum(r["status"] != 200 for r in results)
    return {
        "images": len(results),
        "errors": failed,
        "seconds": wall,
        "images_per_s": len(results) / wall if wall else 0.0,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(ok) * 1000 if ok else float("nan"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    files, any_dir = collect(args.paths)
    results, wall = asyncio.run(
        query_all(
            files,
            args.url.rstrip("/"),
            args.top_k,
            args.concurrency,
            args.timeout,
            args.per_request,
            os.environ.get(args.api_key_env) or None,
        )
    )
    stats = summary(results, wall, args.per_request)
    if args.json:
        print(json.dumps({"results": results, "summary": stats}, indent=2))
    else:
        notes = {r.get("note") for r in results if r.get("note")}
        for note in sorted(notes):
            print(f"note: {note}")
        for r in results:
            if r["status"] == 200:
                best = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
                print(f"{r['image']}: {best}")
            else:
                print(f"{r['image']}: error {r['status']}: {r['error']}", file=sys.stderr)
        if any_dir or len(files) > 1:
            print(
                f"\n{stats['images']} images in {stats['seconds']:.2f}s: {stats['images_per_s']:.1f} "
                f"images/s, {args.per_request} per request, p50 {stats['p50_ms']:.1f} ms, "
                f"p99 {stats['p99_ms']:.1f} ms per request, {stats['errors']} error(s)"
            )
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
