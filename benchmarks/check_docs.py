"""Open the built docs site in a real headless browser: every page renders and every figure loads.

    python benchmarks/check_docs.py --json figures/docs_check.json [--site DIR] [--browser /usr/bin/chromium]

Builds the site with ``mkdocs build --strict`` into a temporary folder (or takes ``--site``, already built),
serves it with ``http.server`` on 127.0.0.1 (a free port), and visits every page of the site (every
``index.html`` under it; the search page aside) in headless Chromium through Playwright. A page fails on a console
error, an uncaught page error, a request that failed or answered ≥ 400, an ``<img>`` whose ``naturalWidth`` is 0
after load, or a page whose main part rendered no text. Writes ``{"pages", "images", "failures", ...}`` to ``--json`` and exits 1
when anything failed. Needs Debian's ``chromium`` (``apt-get install chromium``) and ``pip install playwright``
(its own browser download is not used: ``--browser`` points at the system's).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(site: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                    "-d", str(site)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def pages(site: Path) -> list[str]:
    """The site's pages as URL paths ("" for the home page), the search page and 404 left out."""
    found = []
    for path in sorted(site.rglob("index.html")):
        rel = path.parent.relative_to(site).as_posix()
        if rel == "search":
            continue
        found.append("" if rel == "." else f"{rel}/")
    return found


@contextlib.contextmanager
def serve(site: Path):
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def check(base: str, paths: list[str], browser: str, timeout_ms: int = 30000) -> dict:
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        version = chromium.version
        for path in paths:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})  # a fresh page: no listener carries over
            problems: list[str] = []
            page.on("console", lambda m, problems=problems: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e, problems=problems: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r, problems=problems: problems.append(f"request failed: {r.url} ({r.failure})"))
            page.on("response", lambda r, problems=problems: problems.append(f"HTTP {r.status}: {r.url}")
                    if r.status >= 400 else None)
            response = page.goto(base + path, wait_until="load", timeout=timeout_ms)
            if response is None or not response.ok:
                problems.append(f"HTTP {response.status if response else 'no response'}: {base + path}")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.currentSrc || e.src, complete: e.complete, width: e.naturalWidth}))")
            for image in images:
                if not image["complete"] or image["width"] == 0:
                    problems.append(f"image not loaded: {image['src']}")
            title = page.evaluate("() => { const h = document.querySelector('h1'); "
                                  "return h ? h.textContent.replace('\u00b6', '').trim() : null; }")
            text = page.evaluate("() => { const m = document.querySelector('[role=main]'); return m ? m.innerText.trim() : ''; }")
            if not text:
                problems.append("empty page: no rendered content")
            results.append({"page": path or "/", "title": title, "images": len(images),
                            "image_sources": sorted({i["src"].removeprefix(base) for i in images}), "problems": problems})
            page.close()
        chromium.close()
    return {"browser": f"chromium {version} (headless, {browser})", "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--site", type=Path, help="an already built site (default: build one into a temporary folder)")
    parser.add_argument("--browser", default="/usr/bin/chromium", help="the Chromium executable (default /usr/bin/chromium)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or Path(tmp) / "site"
        seconds = None if args.site else build(site)
        paths = pages(site)
        with serve(site) as base:
            record = check(base, paths, args.browser)
    results = record.pop("results")
    failures = [{"page": r["page"], "problem": problem} for r in results for problem in r["problems"]]
    summary = {
        "command": "python benchmarks/check_docs.py --json figures/docs_check.json",
        **record,
        "build_seconds": None if seconds is None else round(seconds, 1),
        "pages": len(results),
        "images": sum(r["images"] for r in results),
        "distinct_images": len({src for r in results for src in r["image_sources"]}),
        "failures": failures,
        "python": platform.python_version(),
        "per_page": [{k: r[k] for k in ("page", "title", "images", "image_sources")} for r in results],
    }
    for r in results:
        print(f"{'ok  ' if not r['problems'] else 'FAIL'} {r['page']:<28} {r['images']:>2} images  {r['title']}")
        for problem in r["problems"]:
            print(f"     {problem}")
    print(f"{summary['pages']} pages, {summary['images']} images ({summary['distinct_images']} distinct), "
          f"{len(failures)} failures")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
