"""The demo under load: 1,000 mixed good and bad requests to `edgevlm demo` from concurrent gradio_client clients.

The demo is served as its command serves it, the requests go over loopback, and the server's resident memory
is sampled throughout.

    python benchmarks/demo_soak.py [--requests 1000] [--clients N] [--seed 0] [--timeout 120]
                                   [--bundle DIR] [--out benchmarks/results/demo_soak.json]

The demo runs in its own process, started as ``python -m edgevlm demo --port P`` (the ``edgevlm`` command's
path: it restarts itself once with huge pages asked for, under the same process id) with the demo's own
defaults for ``--queue-size``, ``--concurrency`` and ``--max-upload-mb`` (read from the CLI's parser, so they
follow it), bound to 127.0.0.1 and never shared. Without ``--bundle`` it serves the default model's cpu INT8
bundle from the demo's cache ($EDGEVLM_CACHE, else ~/.cache/edgevlm), exported there first in a separate
process when missing, so the export's memory is not the server's. Uploads land in a temporary
GRADIO_TEMP_DIR, whose size at the end is reported (gradio keeps every stored upload).

Requests go to the ``/answer`` API endpoint (the one ``gradio_client`` callers use), a mix of: good uploads (the
zoo's sample PNGs; JPEG/PNG/WebP of random sizes, modes and shapes drawn with Pillow) and bad ones (a truncated
PNG; text bytes named .png; a decompression-bomb PNG: a valid tiny file whose header claims 81 MP to 4 GP; an
upload past the demo's size limit: gradio_client refuses it before sending, having read the server's limit, so
it is then also posted straight to gradio's upload route, as a browser or curl would, which must answer 413; an
empty or blank question; a question past the demo's length limit; a question of odd Unicode: emoji, RTL and
zero-width marks, combining accents, control characters, a lone surrogate, sent as an escaped JSON string as a
browser sends it). Clients: by default the queue's bound (``queue_size`` waiting + ``concurrency`` running) plus
``--extra-clients`` (4) beyond it, to see the queue refuse.

Each request ends as one of: ``answered`` (the answer's text came back), ``refused`` (a clear refusal: the
app's own error with its title, gradio's "queue is full", or the upload route's 413 naming the size limit), or
``failed`` (anything else: an exception's bare text, an error without a message, a traceback, a timeout, a
connection error). RSS (VmRSS of the server process) is sampled every 0.5 s. Prints progress to stderr and
tables to stdout; writes JSON (every request, every RSS sample) and, with matplotlib, a PNG of RSS over time.
"""
from __future__ import annotations

import argparse
import atexit
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from anywhere: the repo's edgevlm, not an installed one
    sys.path.insert(0, str(ROOT))

# input kind -> share of the requests
KINDS = {
    "good_sample": 0.28, "good_generated": 0.27,
    "truncated_png": 0.06, "not_an_image": 0.06, "bomb_png": 0.06, "oversized": 0.05,
    "empty_prompt": 0.07, "long_prompt": 0.07, "unicode_prompt": 0.08,
}
GOOD_KINDS = ("good_sample", "good_generated", "unicode_prompt")      # the ones that may be answered
QUESTIONS = ["describe the image.", "how many circles are there?", "what color is the square?", "detect circle",
             "point to the star", "is there a red triangle?", "how many shapes are there?"]
ODD_QUESTIONS = [
    "how many circles are there? \U0001F7E2\U0001F534\U0001F468\u200D\U0001F469\u200D\U0001F467",   # emoji, ZWJ
    "\u202Ewhat color is the square?\u202C \u05DE\u05D4 \u0627\u0644\u0644\u0648\u0646",   # RTL, Hebrew, Arabic
    "de\u0301scri\u0301be\u0308 the i\u0336m\u0336a\u0336g\u0336e\u0336.",                       # combining marks
    "\ufeffhow\u200bmany\u200ccircles\u2060are\u00a0there?",                                   # BOM, zero-widths, NBSP
    "what\x00color\x07is\x1b[31mthe\x7fsquare?",                                               # NUL, BEL, ANSI, DEL
    "\uff48\uff4f\uff57 \uff4d\uff41\uff4e\uff59 \u2460\u2461\u2462 circles? \U0001D54F\U0001D560",  # fullwidth, math
    "how many circles? \ud83d",                                                                # a lone surrogate
    "\u0000",                                                                                  # only a NUL
    "\U000E0001\U000E0067\U000F0000 detect circle \uFFFD\uFFFF",                               # tags, private use
]
GENERATED_POOL = 48                    # distinct generated good images (uploads are stored, so keep them bounded)
SAMPLE_EVERY_S = 0.5

_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def demo_defaults() -> dict:
    """The demo's own defaults for the settings that bound it, read from the ``edgevlm demo`` parser."""
    from edgevlm.cli import build_parser

    a = build_parser().parse_args(["demo"])
    return {"queue_size": a.queue_size, "concurrency": a.concurrency, "max_upload_mb": a.max_upload_mb}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- inputs -------------------------------------------------------------------------------------------------
def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height pixels: a decompression bomb to a trusting decoder."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _generated_image(rng: random.Random, path_stem: Path) -> Path:
    """A drawn image (shapes, some with noise) of random size (16..1600 px a side), mode and format (JPEG, PNG
    or WebP)."""
    from PIL import Image, ImageDraw

    fmt = rng.choice(["JPEG", "PNG", "WEBP"])
    mode = rng.choice(["RGB", "RGB", "L"] + (["RGBA"] if fmt != "JPEG" else []))
    w, h = rng.randint(16, 1600), rng.randint(16, 1600)
    bg = tuple(rng.randrange(256) for _ in range(4))
    img = Image.new("RGBA", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 8)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(4, max(5, w // 2))), min(h, y0 + rng.randint(4, max(5, h // 2)))
        fill = tuple(rng.randrange(256) for _ in range(4))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    if rng.random() < 0.3:               # photo-like noise: larger files, harder to compress
        noise = Image.effect_noise((w, h), rng.uniform(10, 80)).convert("RGBA")
        img = Image.blend(img, noise, rng.uniform(0.2, 0.6))
    img = img.convert(mode)
    path = path_stem.with_suffix({"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt])
    kw = {"quality": rng.randint(40, 95)} if fmt in ("JPEG", "WEBP") else {}
    img.save(path, fmt, **kw)
    return path


def make_inputs(folder: Path, rng: random.Random, max_upload_bytes: int) -> dict:
    """Every file the requests upload, made once (seeded)."""
    samples = sorted((ROOT / "models" / "samples").glob("*.png"))
    if not samples:
        raise SystemExit(f"no sample images in {ROOT / 'models' / 'samples'}")
    generated = [_generated_image(rng, folder / f"gen_{i:02d}") for i in range(GENERATED_POOL)]
    truncated = []
    for i, src in enumerate(samples[:4] + [p for p in generated if p.suffix == ".png"][:4]):
        data = src.read_bytes()
        p = folder / f"truncated_{i}.png"
        p.write_bytes(data[:max(16, int(len(data) * rng.uniform(0.2, 0.8)))])
        truncated.append(p)
    not_image = []
    for i, data in enumerate([b"not an image at all\n" * 20, os.urandom(4096), b"<html><body>hi</body></html>",
                              b"%PDF-1.4\n" + os.urandom(512), b""]):
        p = folder / f"notes_{i}.png"
        p.write_bytes(data)
        not_image.append(p)
    bombs = []
    for w, h in ((30_000, 30_000), (9_000, 9_000), (100_000, 9_000), (65_000, 65_000)):
        p = folder / f"bomb_{w}x{h}.png"
        p.write_bytes(_png_claiming(w, h))
        bombs.append(p)
    oversized = folder / "oversized.png"        # a PNG signature, then past the limit of random bytes
    oversized.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(max_upload_bytes + 4096))
    return {"samples": samples, "generated": generated, "truncated": truncated, "not_image": not_image,
            "bombs": bombs, "oversized": [oversized]}


def plan(n: int, seed: int, files: dict) -> list[dict]:
    """n requests: (kind, file, question, max_new_tokens, temperature), in a seeded shuffled order."""
    rng = random.Random(seed)
    counts = {k: int(round(share * n)) for k, share in KINDS.items()}
    counts["good_sample"] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    reqs = []
    for i, kind in enumerate(kinds):
        good = rng.choice(files["samples"] + files["generated"])
        question = rng.choice(QUESTIONS)
        image = {"good_sample": rng.choice(files["samples"]), "good_generated": rng.choice(files["generated"]),
                 "truncated_png": rng.choice(files["truncated"]), "not_an_image": rng.choice(files["not_image"]),
                 "bomb_png": rng.choice(files["bombs"]), "oversized": files["oversized"][0]}.get(kind, good)
        if kind == "empty_prompt":
            question = rng.choice(["", " ", "\n\t  "])
        elif kind == "long_prompt":
            question = ("how many circles are there? " * 400)[:rng.randint(501, 10_000)]
        elif kind == "unicode_prompt":
            question = rng.choice(ODD_QUESTIONS)
        reqs.append({"i": i, "kind": kind, "image": str(image), "question": question,
                     "max_new_tokens": rng.choice([8, 16, 32, 64]), "temperature": rng.choice([0.0, 0.0, 0.7])})
    return reqs


# -- the server ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_default_bundle(env: dict) -> str:
    """The demo's default bundle, exported into its cache (in a separate process) when it is not there yet."""
    code = "from edgevlm.cli import _demo_app; print(_demo_app().default_bundle())"
    say("the demo's default bundle: reusing the demo's cache, exporting on first use (may take minutes)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit("exporting the demo's default bundle failed (see above)")
    return out.stdout.strip().splitlines()[-1]


def start_demo(args, settings: dict, env: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "edgevlm", "demo", "--port", str(port), "--queue-size", str(settings["queue_size"]),
           "--concurrency", str(settings["concurrency"]), "--max-upload-mb", str(settings["max_upload_mb"])]
    cmd += [str(args.bundle)] if args.bundle else []
    say("starting: " + " ".join(cmd[1:]))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if "bundle(s) on http" in line:
                url = line.split(" on ", 1)[1].split()[0]
                return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited ({proc.returncode}) before serving:\n{text[-3000:]}")
        time.sleep(0.5)
    stop_demo(proc)
    raise SystemExit("the demo did not start within 10 minutes")


def stop_demo(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)           # what Ctrl+C does: gradio closes its server
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int, progress):
        super().__init__(daemon=True)
        self.pid, self.progress, self.samples = pid, progress, []
        self.stop = threading.Event()

    def sample(self) -> None:
        r = rss_mib(self.pid)
        if r is not None:
            self.samples.append((round(time.time() - _T0, 2), round(r, 1), self.progress()))

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.sample()


def _dir_mib(folder: Path) -> tuple[float, int]:
    total, n = 0, 0
    for p in folder.rglob("*"):
        if p.is_file():
            total, n = total + p.stat().st_size, n + 1
    return total / 2**20, n


# -- the clients --------------------------------------------------------------------------------------------
def classify_outcome(exc: BaseException | None, result) -> tuple[str, str]:
    """(answered | refused | failed, detail) for one request's result or exception."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    if exc is None:
        answer = result[0] if isinstance(result, (list, tuple)) and result else result
        if not isinstance(answer, str):
            return "failed", f"no answer text: {str(result)[:200]}"
        if "Traceback (most recent call last)" in answer:
            return "failed", "traceback in the answer: " + answer[-300:]
        return "answered", answer[:200]
    text = f"{type(exc).__name__}: {exc}"
    if "Traceback (most recent call last)" in str(exc):
        return "failed", "traceback: " + text[-300:]
    if isinstance(exc, QueueError):
        return "refused", "queue full: " + str(exc)
    if isinstance(exc, AppError):
        title = getattr(exc, "title", "Error") or "Error"
        msg = getattr(exc, "message", str(exc)) or ""
        if "has not enabled verbose error reporting" in msg or not msg.strip():
            return "failed", f"error without a message ({title})"
        if title == "Error":         # not one of the app's titled errors: an exception's own text leaked
            return "failed", f"untitled error: {msg[:300]}"
        return "refused", f"{title}: {msg[:300]}"
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text if exc.response is not None else ""
        if exc.response is not None and exc.response.status_code == 413 and "maximum allowed size" in body:
            return "refused", f"413: {body[:200]}"
        return "failed", f"HTTP {exc.response.status_code if exc.response is not None else '?'}: {body[:200]}"
    if isinstance(exc, TimeoutError):
        return "failed", "timeout"
    if isinstance(exc, ValueError) and "exceeds the maximum file size" in str(exc):
        return "refused", "gradio_client (before sending): " + str(exc)[:250]     # it reads the server's limit
    return "failed", text[:300]


def send_lone_surrogates_as_browsers_do() -> None:
    """httpx encodes JSON as UTF-8 text, so it cannot send a string holding a lone surrogate; a browser's
    JSON.stringify sends one as a ``\\udXXX`` escape. Fall back to ASCII-escaped JSON (the same value for every
    valid string) so the odd-Unicode questions reach the server as a browser would send them."""
    import json as _json

    import httpx._content as content

    plain = content.encode_json
    if getattr(plain, "_soak", False):
        return

    def encode_json(data):
        try:
            return plain(data)
        except UnicodeEncodeError:
            body = _json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()
            return ({"Content-Length": str(len(body)), "Content-Type": "application/json"},
                    content.ByteStream(body))

    encode_json._soak = True
    content.encode_json = encode_json


def upload_past_the_limit(url: str, path: str, outcome: str, detail: str) -> tuple[str, str]:
    """Send the oversized file straight to gradio's upload route, as a browser or curl would."""
    import httpx

    try:
        with open(path, "rb") as f:
            r = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": (Path(path).name, f, "image/png")},
                           timeout=60)
    except httpx.HTTPError as e:
        return "failed", f"{detail}; upload route: {type(e).__name__}: {e}"[:300]
    if r.status_code == 413 and "maximum allowed size" in r.text:
        return (outcome if outcome == "refused" else "failed"), f"upload route 413 ({r.text[:120]}); client: {detail}"
    return "failed", f"upload route answered {r.status_code} (the upload was not refused): {r.text[:150]}"


def run_clients(url: str, reqs: list[dict], n_clients: int, label: str, timeout: float, done_cb) -> list[dict]:
    from gradio_client import Client, handle_file

    send_lone_surrogates_as_browsers_do()
    todo: queue.Queue = queue.Queue()
    for r in reqs:
        todo.put(r)
    records: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(n_clients)

    def worker(cid: int) -> None:
        client = Client(url, verbose=False)
        start.wait()
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            exc, result = None, None
            job = None
            try:
                job = client.submit(handle_file(r["image"]), r["question"], label, "auto", r["max_new_tokens"],
                                    r["temperature"], api_name="/answer")
                result = job.result(timeout=timeout)
            except BaseException as e:       # noqa: BLE001 - every failure is a result here
                exc = e
                if isinstance(e, TimeoutError) and job is not None:
                    job.cancel()
            outcome, detail = classify_outcome(exc, result)
            if r["kind"] == "oversized":
                # gradio_client refuses it before sending (it knows the server's limit); a browser or curl
                # would send it: the server's upload route must refuse it too, unstored
                outcome, detail = upload_past_the_limit(url, r["image"], outcome, detail)
            latency = time.perf_counter() - t0
            rec = {"i": r["i"], "kind": r["kind"], "client": cid, "outcome": outcome, "detail": detail,
                   "latency_s": round(latency, 4), "t_end": round(time.time() - _T0, 2),
                   "image": Path(r["image"]).name, "question": r["question"][:80],
                   "max_new_tokens": r["max_new_tokens"], "temperature": r["temperature"]}
            with lock:
                records.append(rec)
            done_cb(rec)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r["i"])


# -- the report ---------------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> tuple[list[dict], list[dict]]:
    def row(name, recs):
        lat = [r["latency_s"] * 1000 for r in recs]
        ans = [r["latency_s"] * 1000 for r in recs if r["outcome"] == "answered"]
        return {"input kind": name, "requests": len(recs),
                "answered": sum(r["outcome"] == "answered" for r in recs),
                "refused": sum(r["outcome"] == "refused" for r in recs),
                "failed": sum(r["outcome"] == "failed" for r in recs),
                "queue full": sum(r["detail"].startswith("queue full") for r in recs),
                "p50 ms": percentile(lat, 0.5), "p95 ms": percentile(lat, 0.95),
                "answered p50 ms": percentile(ans, 0.5), "answered p95 ms": percentile(ans, 0.95)}

    rows = [row(k, [r for r in records if r["kind"] == k]) for k in KINDS]
    rows.append(row("all", records))
    messages: dict[tuple, int] = {}
    for r in records:
        if r["outcome"] != "answered":
            # one line per kind and message shape (numbers and file names vary)
            key = (r["kind"], r["outcome"], re.sub(r"\d+", "N", r["detail"])[:110])
            messages[key] = messages.get(key, 0) + 1
    msg_rows = [{"input kind": k, "outcome": o, "count": c, "message (first 110 chars, digits as N)": m}
                for (k, o, m), c in sorted(messages.items(), key=lambda kv: (kv[0][0], -kv[1]))]
    return rows, msg_rows


def rss_summary(samples: list[tuple], n: int) -> dict:
    if not samples:
        return {}
    rss = [s[1] for s in samples]
    first_done = next((s for s in samples if s[2] >= max(1, n // 10)), samples[0])    # after 10% of the requests
    out = {"start_mib": rss[0], "peak_mib": max(rss), "end_mib": rss[-1], "samples": len(rss),
           "after_10pct_mib": first_done[1]}
    # growth per 100 requests over the last 90% (after the bundle is loaded): least squares on (done, rss)
    tail = [(s[2], s[1]) for s in samples if s[2] >= max(1, n // 10)]
    if len(tail) >= 2 and tail[-1][0] > tail[0][0]:
        mx = sum(x for x, _ in tail) / len(tail)
        my = sum(y for _, y in tail) / len(tail)
        var = sum((x - mx) ** 2 for x, _ in tail)
        cov = sum((x - mx) * (y - my) for x, y in tail)
        out["growth_mib_per_100_requests"] = round(100 * cov / var, 2) if var else 0.0
    return out


def plot(samples: list[tuple], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [s[0] - samples[0][0] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [s[1] for s in samples], color="tab:blue", lw=1.2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [s[2] for s in samples], color="tab:gray", lw=0.8, ls="--")
    ax2.set_ylabel("requests done", color="tab:gray")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    ap.add_argument("--clients", type=int, help="concurrent clients (default: the queue's bound + --extra-clients)")
    ap.add_argument("--extra-clients", type=int, default=4, help="clients beyond the queue's bound (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one request may take (default 120)")
    ap.add_argument("--bundle", type=Path, help="serve this bundle (default: the demo's default, from its cache)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_soak.json")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be at least 1")

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from edgevlm.report import table, write_json

    settings = demo_defaults()
    bound = settings["queue_size"] + settings["concurrency"]
    n_clients = args.clients or bound + args.extra_clients
    work = Path(tempfile.mkdtemp(prefix="edgevlm-soak-"))
    atexit.register(shutil.rmtree, work, True)          # inputs, uploads and the demo's log, however this ends
    uploads = work / "gradio-uploads"
    uploads.mkdir()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(uploads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    bundle = str(args.bundle) if args.bundle else ensure_default_bundle(env)
    label = Path(bundle).name

    rng = random.Random(args.seed)
    (work / "inputs").mkdir()
    files = make_inputs(work / "inputs", rng, int(settings["max_upload_mb"] * 2**20))
    reqs = plan(args.requests, args.seed, files)
    mix = ", ".join(f"{k} {sum(r['kind'] == k for r in reqs)}" for k in KINDS)
    say(f"{len(reqs)} requests ({mix}); "
        f"{n_clients} clients; demo queue {settings['queue_size']} waiting + {settings['concurrency']} running, "
        f"uploads up to {settings['max_upload_mb']:g} MiB")

    log_path = work / "demo.log"
    proc, url = start_demo(args, settings, env, log_path)
    done = {"n": 0, "answered": 0, "refused": 0, "failed": 0}
    lock = threading.Lock()
    sampler = RssSampler(proc.pid, lambda: done["n"])
    sampler.sample()
    sampler.start()
    say(f"demo pid {proc.pid} on {url}, RSS {sampler.samples[0][1] if sampler.samples else '?'} MiB")
    every = max(1, args.requests // 20)

    def on_done(rec):
        with lock:
            done["n"] += 1
            done[rec["outcome"]] += 1
            n = done["n"]
        if n % every == 0 or n == args.requests:
            rss = sampler.samples[-1][1] if sampler.samples else float("nan")
            say(f"{n}/{args.requests}: answered {done['answered']}, refused {done['refused']}, "
                f"failed {done['failed']}; server RSS {rss:.0f} MiB")

    t0 = time.time()
    try:
        records = run_clients(url, reqs, n_clients, label, args.timeout, on_done)
        wall = time.time() - t0
        time.sleep(1.0)
        sampler.sample()
        alive = proc.poll() is None
    finally:
        sampler.stop.set()
        stop_demo(proc)
    log_text = log_path.read_text(errors="replace")
    upload_mib, upload_files = _dir_mib(uploads)

    rows, msg_rows = summarize(records)
    rss = rss_summary(sampler.samples, args.requests)
    cpu = cpu_name()
    cols = ["input kind", "requests", "answered", "refused", "failed", "queue full", "p50 ms", "p95 ms",
            "answered p50 ms", "answered p95 ms"]
    print(table(rows, cols, title=f"demo soak: {len(records)} requests to /answer from {n_clients} clients, "
                f"{label} (queue {settings['queue_size']} + {settings['concurrency']} running) on {cpu}"))
    print("\n" + table(msg_rows, title="what was refused or failed, by message"))
    print("\n" + table([{"server RSS": "start (served, bundle not loaded)", "MiB": rss.get("start_mib")},
                        {"server RSS": "after 10% of the requests", "MiB": rss.get("after_10pct_mib")},
                        {"server RSS": "peak", "MiB": rss.get("peak_mib")},
                        {"server RSS": "end", "MiB": rss.get("end_mib")},
                        {"server RSS": "growth after 10% (MiB / 100 requests)",
                         "MiB": rss.get("growth_mib_per_100_requests")}],
                       title=f"server memory ({rss.get('samples', 0)} samples every {SAMPLE_EVERY_S} s)"))
    tracebacks = log_text.count("Traceback (most recent call last)")
    print(f"\nwall {wall:.1f} s ({len(records) / wall:.1f} requests/s); server alive at the end: {alive}; "
          f"tracebacks in the server log: {tracebacks}; stored uploads {upload_files} files, {upload_mib:.1f} MiB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(sampler.samples, args.out.with_suffix(".png"),
               f"demo soak: server RSS, {len(records)} requests, {n_clients} clients ({cpu})")
    write_json(args.out, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu, "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "clients": n_clients,
        "demo": {"url": url, "bundle": bundle, **settings, "alive_at_end": alive, "log_tracebacks": tracebacks,
                 "log_tail": log_text[-4000:], "stored_uploads_files": upload_files,
                 "stored_uploads_mib": round(upload_mib, 2)},
        "wall_s": round(wall, 2), "summary": rows, "messages": msg_rows, "rss": rss,
        "rss_samples": [{"t_s": t, "rss_mib": r, "done": d} for t, r, d in sampler.samples],
        "requests": records, "plot": str(png) if png else None})
    say(f"wrote {args.out}" + (f" and {png}" if png else ""))
    failed = sum(r["outcome"] == "failed" for r in records)
    return 0 if alive and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
