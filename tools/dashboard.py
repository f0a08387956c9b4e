"""Open the published asv dashboard in headless chromium: screenshot and a DOM check.

Usage (after ``asv publish`` in ``asv_benchmarks/``)::

    python tools/dashboard.py                          # asv_benchmarks/html, default graph
    python tools/dashboard.py --html DIR --out shot.png --bench bench_algorithms.Algorithm.time_call

The published HTML fetches its JSON with XMLHttpRequest, which chromium blocks
for ``file://`` pages, so the directory is served on 127.0.0.1 by
``http.server`` in a background thread (the same as ``asv preview``) while
chromium (Debian's ``chromium`` package: ``apt-get install chromium``) loads

* ``index.html`` (the grid of benchmark summary plots), dumping its DOM, and
* ``#<benchmark>`` (one benchmark's graph over commits), screenshotting it and
  dumping its DOM.

The check passes when the DOM holds plot elements (flot's ``canvas``) and
benchmark names and no asv error message. Exit status 0 on success, 1 on a
failed check, 2 when chromium or the HTML is missing.
"""

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HTML = os.path.join(ROOT, "asv_benchmarks", "html")
DEFAULT_BENCH = "bench_algorithms.Algorithm.time_call"

#: What asv's pages show when they could not load their data.
ERROR_PATTERNS = [r"Failed to load", r"Error loading", r"Could not load", r"Cannot load",
                  r"No data found", r"NetworkError", r"404 Not Found"]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def published(html_dir):
    """True if ``html_dir`` holds a published asv site (index.html and index.json)."""
    return all(os.path.isfile(os.path.join(html_dir, f)) for f in ("index.html", "index.json"))


def benchmark_names(html_dir):
    """Benchmark names listed in the published ``index.json``."""
    with open(os.path.join(html_dir, "index.json")) as f:
        return sorted(json.load(f).get("benchmarks", {}))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server:
    """``http.server`` on 127.0.0.1 (free port) serving ``html_dir`` in a daemon thread."""

    def __init__(self, html_dir):
        handler = functools.partial(_Quiet, directory=html_dir)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _chromium(chromium, *args, timeout=90):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=10000",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(chromium, url, timeout=90):
    """The DOM of ``url`` after its scripts ran (chromium ``--dump-dom``)."""
    return _chromium(chromium, "--dump-dom", url, timeout=timeout).stdout


def screenshot(chromium, url, out, timeout=90):
    """Screenshot of ``url`` as PNG at ``out``; return the path."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        os.remove(out)
    _chromium(chromium, f"--screenshot={out}", url, timeout=timeout)
    if not os.path.isfile(out):
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def check_dom(dom, names):
    """Problems found in a rendered asv page (empty list: it rendered graphs).

    ``names``: benchmark names at least one of which must appear in the DOM.
    """
    problems = []
    if not dom.strip():
        return ["empty DOM (chromium failed?)"]
    canvases = len(re.findall(r"<canvas\b", dom))
    if canvases == 0:
        problems.append("no <canvas> plot element")
    if not any(name in dom for name in names):
        problems.append("no benchmark name in the page")
    for pat in ERROR_PATTERNS:
        if re.search(pat, dom, re.IGNORECASE):
            problems.append(f"error message in the page: {pat!r}")
    return problems


def run(html_dir=DEFAULT_HTML, out="dashboard.png", bench=DEFAULT_BENCH, chromium=None,
        timeout=90):
    """Serve, dump and screenshot; return a dict with the results (see ``main``)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    if not published(html_dir):
        raise FileNotFoundError(f"no published asv site in {html_dir} (run asv publish)")
    names = benchmark_names(html_dir)
    if bench not in names and names:
        bench = names[0]
    with Server(html_dir) as srv:
        index_dom = dump_dom(chromium, srv.url + "index.html", timeout)
        graph_url = srv.url + "index.html#" + bench
        graph_dom = dump_dom(chromium, graph_url, timeout)
        shot = screenshot(chromium, graph_url, out, timeout)
    short = [n.rsplit(".", 1)[-1] for n in names] + names
    return {"url": graph_url, "screenshot": shot, "benchmark": bench, "benchmarks": len(names),
            "index_canvases": len(re.findall(r"<canvas\b", index_dom)),
            "graph_canvases": len(re.findall(r"<canvas\b", graph_dom)),
            "index_problems": check_dom(index_dom, short),
            "graph_problems": check_dom(graph_dom, [bench, bench.rsplit(".", 1)[-1]])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--html", default=DEFAULT_HTML, help="published asv html directory")
    p.add_argument("--out", default="dashboard.png", help="screenshot path (PNG)")
    p.add_argument("--bench", default=DEFAULT_BENCH, help="benchmark whose graph to shoot")
    p.add_argument("--chromium", default=None, help="chromium executable")
    a = p.parse_args(argv)
    try:
        res = run(a.html, a.out, a.bench, a.chromium)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 1 if res["index_problems"] or res["graph_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
