"""What every harness in fuzz/ shares: the command line, the engine, the rule, the findings, the summary.

The rule: whatever the target does with an input, it either returns (the expected result) or raises edgevlm's own
:class:`~edgevlm.errors.EdgeVLMError`; any other exception is a *finding* (saved with its input and traceback under
``fuzz/out/<target>/findings/``), and a native crash (a signal, an abort) or a hang is a *crash*.

Engine: atheris (libFuzzer, coverage-guided over edgevlm's Python code) when it is installed, otherwise a plain
random mutator over the same seeds (``--engine random``), so the harnesses run everywhere. Either way the engine
runs in a child process: the parent restarts it after a native crash (until the time is up) and prints one JSON
summary line last (``executions``, ``unexpected``, ``crashes``, ``corpus_files``, ...); the exit code is 1 when
there was any finding or crash.

    python fuzz/fuzz_manifest.py --seconds 600                  # fuzz for 10 minutes
    python fuzz/fuzz_manifest.py --seconds 30 --engine random   # without atheris

Corpus: the committed seeds in ``fuzz/corpus/<target>/`` (small, hand-picked), seeds each harness generates at
start-up (GGUF, ONNX and safetensors files: nothing large is committed) in ``fuzz/out/<target>/generated/``, and the
units the fuzzer finds in ``fuzz/out/<target>/corpus/`` (not committed). Exported bundles the harnesses mutate are
cached in ``$EDGEVLM_FUZZ_CACHE`` (default ``~/.cache/edgevlm/fuzz``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:                 # run as a script from anywhere: import this checkout's edgevlm
    sys.path.insert(0, str(REPO))

try:
    import atheris                             # noqa: F401
    HAVE_ATHERIS = True
except ImportError:                            # pragma: no cover - depends on the environment
    atheris = None
    HAVE_ATHERIS = False


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGEVLM_FUZZ_CACHE") or Path.home() / ".cache" / "edgevlm" / "fuzz")
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class Target:
    """A harness: ``load()`` imports the code under test (instrumented under atheris) and returns a context;
    ``one_input(ctx, data, recorder)`` runs one input (``recorder.count(what)`` notes what it reached,
    ``recorder.crash(why, data)`` a helper process's native crash); ``seeds(ctx, folder)`` writes generated
    seeds into ``folder``."""
    name: str
    load: Callable[[], object]
    one_input: Callable[[object, bytes, "Recorder"], None]
    seeds: Callable[[object, Path], None] | None = None
    max_len: int = 1 << 16
    timeout_s: int = 60
    rss_limit_mb: int = 4096
    instrument: tuple[str, ...] = ("edgevlm",)
    extra_args: list[str] = field(default_factory=list)


# -- mutation helpers (driven by the fuzzer's bytes, so that libFuzzer steers them) --------------------------
class Source:
    """Decisions drawn from the input's bytes (atheris' FuzzedDataProvider when present, else the same idea in
    Python): every choice a structured mutator makes comes from the input, so inputs replay exactly."""

    def __init__(self, data: bytes):
        self.data, self.i = bytes(data), 0

    def remaining(self) -> int:
        return len(self.data) - self.i

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (lo when the input is used up)."""
        if hi <= lo:
            return lo
        span = hi - lo
        nbytes = (span.bit_length() + 7) // 8
        chunk = self.data[self.i:self.i + nbytes]
        self.i += len(chunk)
        return lo + int.from_bytes(chunk.ljust(nbytes, b"\0"), "little") % (span + 1)

    def bool(self) -> bool:
        return bool(self.int(0, 1))

    def pick(self, seq):
        seq = list(seq)
        return seq[self.int(0, len(seq) - 1)] if seq else None

    def bytes(self, n: int) -> bytes:
        b = self.data[self.i:self.i + n]
        self.i += len(b)
        return b

    def text(self, n: int) -> str:
        return self.bytes(n).decode("utf-8", "replace")


INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 4096,
                    65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                    -2**31, -2**63, 10**30]
INTERESTING_VALUES = [None, True, False, "", " ", "x", "../x", "/etc/hostname", "a/../../b", "C:\\x", "\x00",
                      "é", "{prompt}", "<image>", "{prompt}{prompt}", "x" * 5000, 0.0, -0.0, 0.5, 1e-300, 1e308,
                      float("inf"), float("-inf"), float("nan"), [], {}, [[]], [None], [0], [1, 2, 3],
                      {"": None}, {"path": "x"}, [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    out = [(prefix, obj)]
    stack = [(prefix, obj)]
    while stack and len(out) < 5000:
        p, o = stack.pop()
        kids = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in kids:
            out.append((p + (k,), v))
            if isinstance(v, (dict, list)):
                stack.append((p + (k,), v))
    return out


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _depth(obj) -> int:
    peak, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            peak = max(peak, d)
            stack.extend((k, d + 1) for k in (o.values() if isinstance(o, dict) else o))
    return peak


MAX_DEPTH = 300      # deeper than any reader accepts, shallow enough for json.dumps' recursion


def mutate_json(obj, src: Source, max_ops: int = 6):
    """Apply up to ``max_ops`` structural edits chosen by ``src`` to a (deep-copied) JSON value."""
    obj = copy.deepcopy(obj)
    for _ in range(src.int(1, max_ops)):
        before = copy.deepcopy(obj)
        obj = _edit(obj, src)
        if _depth(obj) > MAX_DEPTH:
            obj = before
    return obj


def _edit(obj, src: Source):
    """One structural edit (in place where it can; returns the new root)."""
    nodes = _paths(obj)
    path, value = src.pick(nodes)
    op = src.int(0, 11)
    parent = _get(obj, path[:-1]) if path else None
    key = path[-1] if path else None

    def put(v):
        nonlocal obj
        if parent is None:
            obj = v
        else:
            parent[key] = v

    if op == 0 and parent is not None:                       # delete
        del parent[key]
    elif op == 1:                                              # an interesting value
        put(copy.deepcopy(src.pick(INTERESTING_VALUES)))
    elif op == 2:                                              # an interesting integer
        put(src.pick(INTERESTING_INTS))
    elif op == 3:                                              # a value of another place
        put(copy.deepcopy(src.pick(nodes)[1]))
    elif op == 4:                                              # another type, same content
        put([value] if src.bool() else {"v": value} if src.bool() else json.dumps(value, allow_nan=True))
    elif op == 5:                                              # random text from the input
        put(src.text(src.int(0, 40)))
    elif op == 6 and isinstance(value, dict):                  # add a key
        value[src.pick(["path", "kind", "task", "files", "sha256", "size", src.text(8)])] = \
            copy.deepcopy(src.pick(INTERESTING_VALUES + INTERESTING_INTS))
    elif op == 7 and isinstance(value, list) and value:        # grow or shrink a list
        if src.bool():
            value.extend(copy.deepcopy(value[: src.int(1, len(value))] * src.int(1, 4)))
        else:
            del value[src.int(0, len(value) - 1):]
    elif op == 8 and isinstance(value, (int, float)) and not isinstance(value, bool):   # nudge a number
        put(value + src.pick([-1, 1, -2**31, 2**31, 0.5]) if src.bool() else -value)
    elif op == 9 and isinstance(value, str):                   # edit a string
        i = src.int(0, len(value))
        put(value[:i] + src.pick(["/", "..", "\\", "\x00", "{prompt}", "<image>", "é", "", "x"]) + value[i:])
    elif op == 10 and isinstance(value, dict) and value:       # rename a key
        k = src.pick(list(value))
        value[src.pick([k.upper(), k + "/", "../" + k, "", k + "x"])] = value.pop(k)
    elif op == 11:                                             # deep nesting
        v = value
        for _ in range(src.int(1, 60)):
            v = [v]
        put(v)
    return obj


_INT_PACK = ["<B", "<H", "<I", "<Q", "<i", "<q"]


def mutate_bytes(data: bytes, src: Source, max_ops: int = 4, interesting=INTERESTING_INTS) -> bytes:
    """Byte-level edits chosen by ``src``: bit flips, interesting integers, truncation, insertion, deletion,
    duplication."""
    b = bytearray(data)
    for _ in range(src.int(1, max_ops)):
        op = src.int(0, 7)
        n = len(b)
        pos = src.int(0, max(0, n - 1))
        if op == 0 and n:                                          # flip bits
            b[pos] ^= 1 << src.int(0, 7)
        elif op == 1 and n:                                        # an interesting integer
            fmt = src.pick(_INT_PACK)
            v = src.pick(interesting)
            size = struct.calcsize(fmt)
            signed = fmt[1].islower()
            lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if signed else (0, (1 << 8 * size) - 1)
            v = min(max(v, lo), hi)
            b[pos:pos + size] = struct.pack(fmt, v)
        elif op == 2:                                              # truncate
            del b[src.int(0, n):]
        elif op == 3:                                              # insert bytes
            b[pos:pos] = src.bytes(src.int(1, 64)) or b"\xff"
        elif op == 4 and n:                                        # delete a range
            del b[pos:pos + src.int(1, 256)]
        elif op == 5 and n:                                        # duplicate a range
            chunk = b[pos:pos + src.int(1, 512)]
            at = src.int(0, len(b))
            b[at:at] = chunk
        elif op == 6 and n:                                        # random bytes over a range
            r = src.bytes(src.int(1, 16))
            b[pos:pos + len(r)] = r
        elif op == 7 and n:                                        # zero a range
            k = src.int(1, 4096)
            b[pos:pos + k] = bytes(len(b[pos:pos + k]))
    return bytes(b)


# -- findings ------------------------------------------------------------------------------------------------
class Recorder:
    """Counts executions and unexpected exceptions; saves one input + traceback per distinct finding."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.findings_dir = out / "findings"
        self.findings_dir.mkdir(parents=True, exist_ok=True)
        self.stats_path = out / "stats.json"
        self.execs = self.unexpected = self.crashes = 0
        self.kinds: dict[str, int] = {}
        self.crash_kinds: dict[str, int] = {}
        self.counts: dict[str, int] = {}          # what the inputs reached (harness-defined)
        self.start = time.monotonic()
        self._last_write = 0.0

    def key(self, e: BaseException) -> str:
        """Exception type + the innermost frame in edgevlm (else the innermost of all): one per bug."""
        if getattr(e, "fuzz_key", None):
            return e.fuzz_key
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "/edgevlm/" in f.filename.replace("\\", "/")]
        f = (ours or frames or [None])[-1]
        where = f"{Path(f.filename).name}:{f.lineno}" if f else "?"
        return f"{type(e).__name__}@{where}"

    def finding(self, e: BaseException, data: bytes) -> None:
        self.unexpected += 1
        k = self.key(e)
        first = k not in self.kinds
        self.kinds[k] = self.kinds.get(k, 0) + 1
        if first:
            safe = "".join(c if c.isalnum() else "_" for c in k)
            stem = self.findings_dir / (safe + "-" + hashlib.sha1(data).hexdigest()[:10])
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            print(f"[fuzz {self.name}] FINDING {k}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        self.write(force=first)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def crash(self, why: str, data: bytes) -> None:
        """A native crash of a helper process (the harness itself survives): counted apart from exceptions."""
        self.crashes += 1
        self.crash_kinds[why] = self.crash_kinds.get(why, 0) + 1
        if self.crash_kinds[why] <= 10:                 # up to ten inputs of each kind, to tell causes apart
            stem = self.findings_dir / ("crash-" + hashlib.sha1(data).hexdigest()[:12])
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(why + "\n")
            print(f"[fuzz {self.name}] CRASH {why}", file=sys.stderr, flush=True)
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        self._last_write = now
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"executions": self.execs, "unexpected": self.unexpected, "kinds": self.kinds,
                                   "crashes": self.crashes, "crash_kinds": self.crash_kinds,
                                   "counts": self.counts}))
        os.replace(tmp, self.stats_path)


def expected(e: BaseException) -> bool:
    from edgevlm.errors import EdgeVLMError

    return isinstance(e, EdgeVLMError)


# -- engines ------------------------------------------------------------------------------------------------
def _corpus_dirs(target: Target, out: Path) -> list[Path]:
    dirs = [out / "corpus", out / "generated", HERE / "corpus" / target.name]
    for d in dirs[:2]:
        d.mkdir(parents=True, exist_ok=True)
    return [d for d in dirs if d.is_dir()]


def work_dir() -> Path:
    """A scratch folder of this fuzzing process (``<out>/work``), emptied when the engine starts."""
    return Path(os.environ["EDGEVLM_FUZZ_WORK"])


def _child(target: Target, args) -> None:
    import warnings

    warnings.filterwarnings("ignore")   # Pillow's and others' warnings about broken inputs: noise in the log
    out = Path(args.out)
    rec = Recorder(out, target.name)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["EDGEVLM_FUZZ_WORK"] = str(work)
    if HAVE_ATHERIS and args.engine == "atheris":
        with atheris.instrument_imports(include=list(target.instrument)):
            ctx = target.load()
    else:
        ctx = target.load()
    dirs = _corpus_dirs(target, out)
    if target.seeds is not None and not any((out / "generated").iterdir()):
        target.seeds(ctx, out / "generated")

    def one(data: bytes) -> None:
        rec.execs += 1
        try:
            target.one_input(ctx, data, rec)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:      # noqa: BLE001 - the rule: only EdgeVLMError is expected (a Rust panic
            if not expected(e):         # from pyo3 is a BaseException, and a finding too)
                rec.finding(e, data)
        rec.write()

    deadline = time.monotonic() + args.seconds
    if HAVE_ATHERIS and args.engine == "atheris":
        argv = [sys.argv[0], f"-max_total_time={max(1, int(args.seconds))}", f"-timeout={target.timeout_s}",
                f"-rss_limit_mb={target.rss_limit_mb}", f"-max_len={target.max_len}", "-print_final_stats=1",
                f"-artifact_prefix={out / 'findings'}/", *target.extra_args, *map(str, dirs)]
        atheris.Setup(argv, one)
        atheris.Fuzz()                  # exits the process at max_total_time
        return
    # the plain engine (no coverage feedback): the seeds, then random byte mutations and splices of them, and
    # fresh random programs for the structured mutators (inputs starting with 0x01)
    rng = random.Random(args.seed)
    pool = [p.read_bytes()[: target.max_len] for d in dirs for p in sorted(d.iterdir()) if p.is_file()] or [b""]
    for data in list(pool):
        one(data)
    while time.monotonic() < deadline:
        if rng.random() < 0.3:
            one(b"\x01" + rng.randbytes(rng.randint(16, 512)))
            continue
        base = rng.choice(pool)
        noise = rng.randbytes(rng.randint(1, 64))
        data = mutate_bytes(base, Source(noise), max_ops=4)[: target.max_len]
        if rng.random() < 0.3:          # splice two inputs
            other = rng.choice(pool)
            cut = rng.randint(0, len(data))
            data = data[:cut] + other[rng.randint(0, len(other)):][: target.max_len - cut]
        one(data)
    rec.write(force=True)


def _read_stats(out: Path) -> dict:
    try:
        return json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def _parent(target: Target, args, script: Path) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    execs = unexpected = 0
    kinds: dict[str, int] = {}
    crashes: dict[str, int] = {}
    counts: dict[str, int] = {}
    runs = 0
    log = out / "engine.log"
    with log.open("w") as logf:
        while True:
            left = args.seconds - (time.monotonic() - t0)
            if runs and left < 5:
                break
            runs += 1
            cmd = [sys.executable, str(script), "--child", "--seconds", str(max(1, int(left))), "--engine",
                   args.engine, "--out", str(out), "--seed", str(args.seed + runs)]
            (out / "stats.json").unlink(missing_ok=True)
            logf.flush()
            start = log.stat().st_size
            # a hard limit: libFuzzer stops by itself; this only catches a child stuck outside it
            try:
                p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=left + 600)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = -signal.SIGKILL
            st = _read_stats(out)
            logf.flush()
            text = log.read_bytes()[start:].decode("utf-8", "replace")
            counted = [int(x) for x in re.findall(r"stat::number_of_executed_units:\s+(\d+)", text)]
            execs += max([st.get("executions", 0)] + counted)
            unexpected += st.get("unexpected", 0)
            for k, v in st.get("kinds", {}).items():
                kinds[k] = kinds.get(k, 0) + v
            for k, v in st.get("crash_kinds", {}).items():
                crashes[k] = crashes.get(k, 0) + v
            for k, v in st.get("counts", {}).items():
                counts[k] = counts.get(k, 0) + v
            if rc != 0:
                tail = text[-4000:]
                why = next((line for line in tail.splitlines()[::-1]
                            if "ERROR: libFuzzer" in line or "deadly signal" in line or "Fatal Python" in line),
                           f"exit code {rc}")
                why = why.strip()[:200]
                crashes[why] = crashes.get(why, 0) + 1
                print(f"[fuzz {target.name}] CRASH ({why.strip()[:200]}); see {log}", file=sys.stderr, flush=True)
                if args.stop_on_crash:
                    break
                continue
            if not (HAVE_ATHERIS and args.engine == "atheris"):
                break
            if time.monotonic() - t0 >= args.seconds - 5:
                break
    corpus = sum(1 for d in _corpus_dirs(target, out) for p in d.iterdir() if p.is_file())
    summary = {"target": target.name, "engine": args.engine, "seconds": args.seconds,
               "wall_s": round(time.monotonic() - t0, 1), "executions": execs, "corpus_files": corpus,
               "unexpected": unexpected, "unique_findings": len(kinds), "findings": kinds,
               "crashes": sum(crashes.values()),
               "crash_reasons": crashes, "reached": counts, "out": str(out)}
    print(json.dumps(summary), flush=True)
    return 1 if unexpected or crashes else 0


def main(target: Target, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=f"fuzz edgevlm's {target.name} reader")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    ap.add_argument("--engine", choices=["atheris", "random"], default="atheris" if HAVE_ATHERIS else "random")
    ap.add_argument("--out", default=str(HERE / "out" / target.name), help="work corpus, findings, stats")
    ap.add_argument("--seed", type=int, default=0, help="the random engine's seed")
    ap.add_argument("--stop-on-crash", action="store_true", help="stop at the first native crash")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine == "atheris" and not HAVE_ATHERIS:
        ap.error("atheris is not installed (pip install atheris), use --engine random")
    if args.child:
        _child(target, args)
        return 0
    return _parent(target, args, Path(sys.argv[0]).resolve())
