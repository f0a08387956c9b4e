"""Open the published asv dashboard offline in headless chromium: screenshot and a DOM check.

Usage (after ``asv publish`` in ``asv_benchmarks/``)::

    python tools/dashboard.py                          # asv_benchmarks/html, default graph
    python tools/dashboard.py --html DIR --out shot.png --bench bench_algorithms.Algorithm.time_call
    python tools/dashboard.py --serve [--port 8080]    # serve it offline for a browser

asv (0.6) writes an ``index.html`` that loads jQuery, flot, bootstrap, md5,
stupidtable and the orderBars plugin from CDNs (code.jquery.com, cdnjs,
jsdelivr); without internet access the page only shows asv's "external
(JavaScript) dependencies failed to load". This script therefore serves the
site with those URLs mapped to local copies fetched from the npm registry
(``npm pack``, cached as tarballs in ``asv_benchmarks/.vendor/`` or
``--vendor DIR``; nothing in ``html/`` is changed):

=================================  =====================================  ============
CDN file                           npm package, file                      SRI
=================================  =====================================  ============
jquery-3.3.1.min.js                jquery@3.3.1 dist/jquery.min.js        identical
flot 0.8.3 jquery.flot*.min.js     flot@0.8.3 jquery.flot*.js             unminified
flot-orderbars@1.0.0               flot-orderbars@1.0.0 (same path)       identical
stupidtable 1.0.1 (cdnjs)          stupid-table-plugin@1.1.3 *.min.js     newer [#]_
blueimp-md5 2.19.0 md5.min.js      blueimp-md5@2.19.0 js/md5.min.js       identical
bootstrap@3.1.1 js and css         bootstrap@3.1.1 (same path)            identical
=================================  =====================================  ============

.. [#] stupidtable 1.0.1 is not on npm; 1.1.3 is the only published version.

Where the local file has the hash of the tag's ``integrity`` attribute the
attribute is kept (the browser verifies it); otherwise it is dropped.

The published HTML fetches its JSON with XMLHttpRequest, which chromium blocks
for ``file://`` pages, so the directory is served on 127.0.0.1 by
``http.server`` in a background thread (as ``asv preview`` does) while
chromium (Debian's ``chromium`` package: ``apt-get install chromium``) loads

* ``index.html`` (the grid of benchmark summary plots), dumping its DOM, and
* ``#<benchmark>`` (one benchmark's graph over commits), screenshotting it and
  dumping its DOM.

The check passes when the DOM holds plot elements (flot's ``canvas``) and
benchmark names and no asv error message. Exit status 0 on success, 1 on a
failed check, 2 when chromium, the HTML or the vendored scripts are missing.
"""

import argparse
import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HTML = os.path.join(ROOT, "asv_benchmarks", "html")
DEFAULT_VENDOR = os.environ.get("NUMBAROPE_ASV_VENDOR",
                                os.path.join(ROOT, "asv_benchmarks", ".vendor"))
#: The history of main (asv_benchmarks/README.md), commit dates on the axis.
DEFAULT_BENCH = "bench_attention.History.time_fast?x-axis-scale=date"
#: URL prefix under which the local copies of the CDN files are served.
VENDOR_PREFIX = "_vendor/"

#: What asv's pages show when they could not load their data or scripts.
ERROR_PATTERNS = [r"Failed to load", r"Error loading", r"Could not load", r"Cannot load",
                  r"No data found", r"NetworkError", r"404 Not Found"]

#: CDN URL (regex) -> (npm package, version, file in the package); ``\\1``.. from the URL.
CDN_RULES = [
    (r"https://code\.jquery\.com/jquery-([\d.]+)\.min\.js",
     ("jquery", r"\1", "dist/jquery.min.js")),
    # jsdelivr's /npm/ URLs are npm packages already (bootstrap, flot-orderbars)
    (r"https://cdn\.jsdelivr\.net/npm/((?:@[^/@]+/)?[^/@]+)@([^/]+)/(.+)",
     (r"\1", r"\2", r"\3")),
    # cdnjs minifies flot itself; npm has the unminified sources of the same release
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/flot/([\d.]+)/(jquery\.flot[\w.]*?)\.min\.js",
     ("flot", r"\1", r"\2.js")),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/blueimp-md5/([\d.]+)/(.+)",
     ("blueimp-md5", r"\1", r"\2")),
    # stupidtable 1.0.1 was never published to npm: its only version there is 1.1.3
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/stupidtable/[\d.]+/stupidtable\.min\.js",
     ("stupid-table-plugin", "1.1.3", "stupidtable.min.js")),
]

_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
_URL_ATTR = re.compile(r"""\b(src|href)=(["'])(https?://[^"']+)\2""", re.IGNORECASE)
_INTEGRITY = re.compile(r"""\s+integrity=(["'])([^"']*)\1""", re.IGNORECASE)
_CROSS = re.compile(r"""\s+(crossorigin|referrerpolicy)=(["'])[^"']*\2""", re.IGNORECASE)


class VendorError(RuntimeError):
    """A CDN file of the asv page could not be mapped to or fetched from npm."""


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


def cdn_urls(html):
    """External ``src``/``href`` URLs of the ``<script>``/``<link>`` tags of ``html``."""
    return [m.group(3) for tag in _TAG.finditer(html)
            for m in _URL_ATTR.finditer(tag.group(0))]


def npm_source(url):
    """``(package, version, file)`` on npm standing in for a CDN ``url``, or None."""
    for pattern, (pkg, ver, path) in CDN_RULES:
        m = re.fullmatch(pattern, url)
        if m:
            return m.expand(pkg), m.expand(ver), m.expand(path)
    return None


def npm_tarball(pkg, version, vendor_dir, npm=None):
    """Path of ``pkg@version``'s npm tarball in ``vendor_dir``, ``npm pack``-ed when missing."""
    name = f"{pkg.lstrip('@').replace('/', '-')}-{version}.tgz"
    path = os.path.join(vendor_dir, name)
    if os.path.isfile(path):
        return path
    npm = npm or shutil.which("npm")
    if npm is None:
        raise VendorError(f"{name} is not in {vendor_dir} and npm is not installed")
    os.makedirs(vendor_dir, exist_ok=True)
    try:
        proc = subprocess.run([npm, "pack", f"{pkg}@{version}", "--json",
                               "--pack-destination", vendor_dir],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VendorError(f"npm pack {pkg}@{version} failed: {exc}") from exc
    if proc.returncode != 0 or not os.path.isfile(path):
        raise VendorError(f"npm pack {pkg}@{version} failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return path


def sri_matches(integrity, data):
    """True if ``data`` has one of the hashes of an SRI ``integrity`` value."""
    for token in integrity.split():
        algo, _, digest = token.partition("-")
        if algo in ("sha256", "sha384", "sha512"):
            if base64.b64encode(hashlib.new(algo, data).digest()).decode() == digest:
                return True
    return False


def vendor_files(urls, vendor_dir=DEFAULT_VENDOR, npm=None):
    """``{cdn_url: (local_path, bytes)}`` for every URL; ``VendorError`` if one has no source."""
    files = {}
    for url in urls:
        src = npm_source(url)
        if src is None:
            raise VendorError(f"no npm source known for {url} (add a rule to CDN_RULES)")
        pkg, ver, path = src
        tgz = npm_tarball(pkg, ver, vendor_dir, npm)
        with tarfile.open(tgz) as tf:
            try:
                member = tf.getmember("package/" + path)
            except KeyError:
                raise VendorError(f"{path} not in {os.path.basename(tgz)}") from None
            data = tf.extractfile(member).read()
        files[url] = (f"{VENDOR_PREFIX}{pkg.lstrip('@').replace('/', '-')}@{ver}/{path}", data)
    return files


def offline_html(html, files):
    """``html`` with each CDN URL of ``files`` replaced by its local path.

    An ``integrity`` attribute stays when the local file has that hash, else it is
    removed together with ``crossorigin``/``referrerpolicy`` (same-origin now).
    """
    def tag(m):
        text = m.group(0)
        urls = [u.group(3) for u in _URL_ATTR.finditer(text) if u.group(3) in files]
        if not urls:
            return text
        local, data = files[urls[0]]
        text = text.replace(urls[0], local)
        sri = _INTEGRITY.search(text)
        if sri is None or not sri_matches(sri.group(2), data):
            text = _CROSS.sub("", _INTEGRITY.sub("", text))
        return text
    return _TAG.sub(tag, html)


class OfflineSite:
    """The published site plus local copies of its CDN files, as served over HTTP.

    ``pages``: ``{url path: bytes}`` served from memory (the rewritten
    ``index.html`` and the vendored files); everything else comes from ``html_dir``.
    """

    def __init__(self, html_dir=DEFAULT_HTML, vendor_dir=DEFAULT_VENDOR, npm=None):
        self.html_dir = html_dir
        with open(os.path.join(html_dir, "index.html"), encoding="utf-8") as f:
            html = f.read()
        self.files = vendor_files(cdn_urls(html), vendor_dir, npm)
        self.html = offline_html(html, self.files)
        left = cdn_urls(self.html)
        if left:
            raise VendorError(f"external URLs left in index.html: {left}")
        #: CDN URLs whose local copy the browser checks against the page's SRI hash
        self.verified = sorted(url for url, (local, _) in self.files.items()
                               if re.search(re.escape(local) + r"""["'][^>]*integrity=""",
                                            self.html))
        self.pages = {"/index.html": self.html.encode("utf-8")}
        self.pages["/"] = self.pages["/index.html"]
        for local, data in self.files.values():
            self.pages["/" + local] = data


class _Handler(http.server.SimpleHTTPRequestHandler):
    pages = {}

    def log_message(self, *args):
        pass

    def _page(self):
        path = urllib.parse.urlsplit(self.path).path
        return self.pages.get(path), path

    def do_GET(self):
        data, path = self._page()
        if data is None:
            return super().do_GET()
        ctype = self.guess_type(path if path != "/" else "/index.html")
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        data, _ = self._page()
        if data is None:
            return super().do_HEAD()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()


class Server:
    """``http.server`` on ``host:port`` (0: a free port) serving an :class:`OfflineSite`."""

    def __init__(self, site, host="127.0.0.1", port=0):
        handler = functools.partial(type("H", (_Handler,), {"pages": site.pages}),
                                    directory=site.html_dir)
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
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
        timeout=90, vendor_dir=DEFAULT_VENDOR, index_out=None):
    """Serve offline, dump and screenshot; return a dict with the results (see ``main``).

    ``index_out``: also screenshot the benchmark grid (``index.html``) there.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    if not published(html_dir):
        raise FileNotFoundError(f"no published asv site in {html_dir} (run asv publish)")
    names = benchmark_names(html_dir)
    if bench.split("?")[0] not in names and names:      # "?x-axis-scale=date": asv's state
        bench = names[0]
    site = OfflineSite(html_dir, vendor_dir)
    with Server(site) as srv:
        index_dom = dump_dom(chromium, srv.url + "index.html", timeout)
        graph_url = srv.url + "index.html#" + bench
        graph_dom = dump_dom(chromium, graph_url, timeout)
        shot = screenshot(chromium, graph_url, out, timeout)
        index_shot = (screenshot(chromium, srv.url + "index.html", index_out, timeout)
                      if index_out else None)
    short = [n.rsplit(".", 1)[-1] for n in names] + names
    return {"url": graph_url, "screenshot": shot, "index_screenshot": index_shot,
            "benchmark": bench, "benchmarks": len(names),
            "vendored": {url: local for url, (local, _) in site.files.items()},
            "sri_verified": site.verified,
            "index_canvases": len(re.findall(r"<canvas\b", index_dom)),
            "graph_canvases": len(re.findall(r"<canvas\b", graph_dom)),
            "index_problems": check_dom(index_dom, short),
            "graph_problems": check_dom(graph_dom, [bench.split("?")[0],
                                                    bench.split("?")[0].rsplit(".", 1)[-1]])}


HISTORY = ("bench_attention.History.time_exact", "bench_attention.History.time_fast",
           "bench_attention.History.track_speedup")


def history_plot(results_dir, out, benchmarks=HISTORY, branch="main"):
    """The noise band asv's graphs do not draw: per commit of ``branch`` with results,
    each benchmark's median (asv's ``result``), its interquartile range over the
    samples (``stats_q_25`` .. ``stats_q_75``, shaded) and asv's 99% interval of the
    median (``stats_ci_99``, whiskers), commits labelled by short hash and date, in
    git order. Needs matplotlib. Returns ``{benchmark: number of commits drawn}``."""
    import datetime
    import glob
    import subprocess

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = subprocess.run(["git", "rev-list", "--reverse", branch], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    rank = {c: i for i, c in enumerate(order)}
    runs = []
    for path in glob.glob(os.path.join(results_dir, "*", "*.json")):
        if os.path.basename(path) == "machine.json":
            continue
        with open(path) as f:
            d = json.load(f)
        if d.get("commit_hash") in rank:
            runs.append(d)
    runs.sort(key=lambda d: rank[d["commit_hash"]])
    fig, axes = plt.subplots(len(benchmarks), 1, figsize=(11, 3.2 * len(benchmarks)),
                             sharex=True, layout="constrained")
    drawn = {}
    for ax, bench in zip(np.atleast_1d(axes), benchmarks):
        rows = []
        for x, d in enumerate(runs):
            r = d["results"].get(bench)
            if r is None:
                continue
            rec = dict(zip(d["result_columns"], r))
            rows.append((x, rec))
        drawn[bench] = len(rows)
        if not rows:
            ax.set_title(f"{bench}: no results")
            continue
        labels = [str(v) for v in rows[0][1]["params"][0]]
        for i, lab in enumerate(labels):
            pts = [(x, rec) for x, rec in rows if rec["result"][i] is not None]
            xs = np.array([x for x, _ in pts])
            med = np.array([rec["result"][i] for _, rec in pts], float)
            line, = ax.plot(xs, med, "o-", ms=3, label=f"is_causal={lab}")
            stats = [rec.get("stats_q_25") for _, rec in pts]
            if all(st is not None for st in stats):
                lo = np.array([rec["stats_q_25"][i] for _, rec in pts], float)
                hi = np.array([rec["stats_q_75"][i] for _, rec in pts], float)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.25, lw=0)
                a = np.array([rec["stats_ci_99_a"][i] for _, rec in pts], float)
                b = np.array([rec["stats_ci_99_b"][i] for _, rec in pts], float)
                ax.errorbar(xs, med, yerr=[np.maximum(med - a, 0), np.maximum(b - med, 0)],
                            fmt="none", ecolor=line.get_color(), alpha=0.5, capsize=2)
        unit = "x" if ".track_speedup" in bench else "seconds"
        ax.set_ylabel(unit)
        ax.set_title(f"{bench} (median; band: interquartile range of the samples; "
                     f"whiskers: asv's 99% interval)", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
        if unit == "seconds":
            ax.set_yscale("log")
    ticks = [f"{d['commit_hash'][:7]}\n"
             f"{datetime.datetime.fromtimestamp(d['date'] / 1000, datetime.timezone.utc):%m-%d %H:%M}"
             for d in runs]
    last = np.atleast_1d(axes)[-1]
    last.set_xticks(range(len(runs)), ticks, rotation=90, fontsize=7)
    last.set_xlabel(f"commits of {branch} with results (git order; commit date UTC)")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def serve(html_dir=DEFAULT_HTML, vendor_dir=DEFAULT_VENDOR, host="127.0.0.1", port=8080):
    """Serve the site offline until interrupted (``--serve``)."""
    if not published(html_dir):
        raise FileNotFoundError(f"no published asv site in {html_dir} (run asv publish)")
    with Server(OfflineSite(html_dir, vendor_dir), host, port) as srv:
        print(f"serving {html_dir} at {srv.url}  (Ctrl-C to stop)", flush=True)
        try:
            srv.thread.join()
        except KeyboardInterrupt:
            pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--html", default=DEFAULT_HTML, help="published asv html directory")
    p.add_argument("--vendor", default=DEFAULT_VENDOR,
                   help="cache of the npm tarballs standing in for the CDN files")
    p.add_argument("--out", default="dashboard.png", help="screenshot path (PNG)")
    p.add_argument("--index-out", default=None, help="also screenshot the grid page here")
    p.add_argument("--bench", default=DEFAULT_BENCH, help="benchmark whose graph to shoot")
    p.add_argument("--chromium", default=None, help="chromium executable")
    p.add_argument("--serve", action="store_true",
                   help="only serve the site offline for a browser, until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address")
    p.add_argument("--port", type=int, default=8080, help="--serve: port")
    p.add_argument("--history", metavar="PNG", default=None,
                   help="only draw the History benchmarks' medians with their noise band "
                        "(from asv's results; matplotlib)")
    p.add_argument("--results", default=os.path.join(ROOT, "asv_benchmarks", "results"),
                   help="--history: asv's results directory")
    a = p.parse_args(argv)
    try:
        if a.history:
            print(json.dumps(history_plot(a.results, a.history), indent=2))
            return 0
        if a.serve:
            serve(a.html, a.vendor, a.host, a.port)
            return 0
        res = run(a.html, a.out, a.bench, a.chromium, vendor_dir=a.vendor,
                  index_out=a.index_out)
    except (FileNotFoundError, VendorError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 1 if res["index_problems"] or res["graph_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
