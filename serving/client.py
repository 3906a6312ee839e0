"""Query the scene-classification endpoint for images or whole directories.

    python serving/client.py photo.jpg other.png                 # top-5 per image
    python serving/client.py ~/photos --concurrency 16 --top-k 1  # a directory: + throughput summary
    python serving/client.py photo.jpg --url http://gpu-node:8000 --json

For a directory (searched recursively for .jpg/.jpeg/.png/.webp/.bmp/.tif) it also prints
images/s, p50/p99 latency and the error count. Exit code 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
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
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="requests in flight at once (default: %(default)s)")
    p.add_argument("--top-k", type=positive_int,
                   help="classes per image (default: the endpoint's, 5 or all classes if fewer)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
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


async def query_all(files: list[Path], url: str, top_k: int | None, concurrency: int,
                    timeout: float):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, path: Path) -> dict:
        async with gate:
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            start = time.perf_counter()
            try:
                params = {"top_k": top_k} if top_k else {}
                r = await client.post(f"{url}/predict", params=params,
                                      content=path.read_bytes(), headers={"Content-Type": ctype})
                latency = time.perf_counter() - start
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                if r.status_code != 200:
                    return {"image": str(path), "status": r.status_code, "latency_s": latency,
                            "error": body.get("error") or r.text[:200]}
                return {"image": str(path), "status": 200, "latency_s": latency,
                        "predictions": body["predictions"], "note": body.get("note")}
            except (httpx.HTTPError, OSError) as e:
                return {"image": str(path), "status": None, "latency_s": time.perf_counter() - start,
                        "error": f"{type(e).__name__}: {e}"}

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, f) for f in files))
        return results, time.perf_counter() - start


def summary(results: list[dict], wall: float) -> dict:
    ok = sorted(r["latency_s"] for r in results if r["status"] == 200)

    def pct(q):
        return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))] * 1000 if ok else float("nan")

    return {"images": len(results), "errors": len(results) - len(ok), "seconds": wall,
            "images_per_s": len(results) / wall if wall else 0.0, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(ok) * 1000 if ok else float("nan")}


def main(argv=None) -> int:
    args = parse_args(argv)
    files, any_dir = collect(args.paths)
    results, wall = asyncio.run(query_all(files, args.url.rstrip("/"), args.top_k, args.concurrency,
                                          args.timeout))
    stats = summary(results, wall)
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
            print(f"\n{stats['images']} images in {stats['seconds']:.2f}s: {stats['images_per_s']:.1f} "
                  f"images/s, p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
                  f"{stats['errors']} error(s)")
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
