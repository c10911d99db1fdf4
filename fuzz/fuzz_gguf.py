"""Fuzz the GGUF reader: ``edgevlm.runtime.gguf_header.read_gguf_header``, then llama.cpp itself
(``LlamaCppDecoder``: load, one prefill, one step) on every file the header check accepts.

Inputs:
- raw: the bytes are the GGUF file (seed: a tiny Llama written with edgevlm's GGUF writer at start-up);
- structured (first byte 0x01): the rest of the bytes drive edits of the seed's parsed header (values, value
  types, keys, array lengths, counts, tensor names, dimensions, types and offsets, alignment, version,
  truncation), re-serialized.
Expected: read_gguf_header returns or raises BundleError; a file it accepts loads in llama.cpp or fails with an
EdgeVLMError. llama.cpp runs in a helper process, so a native crash there (a file the header check should have
refused) is recorded as a crash with its GGUF bytes, and fuzzing goes on.

    python fuzz/fuzz_gguf.py --seconds 600
"""
from __future__ import annotations

import json
import select
import struct
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TYPE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
HPARAMS = ["block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
           "attention.key_length", "attention.value_length", "context_length", "feed_forward_length",
           "rope.dimension_count", "vocab_size", "rope.freq_base", "attention.layer_norm_rms_epsilon",
           "expert_count", "expert_used_count", "attention.sliding_window", "rope.scaling.factor"]


class WorkerError(Exception):
    """An exception other than EdgeVLMError inside the llama.cpp helper."""

    def __init__(self, res: dict):
        super().__init__(f"{res['type']} in LlamaCppDecoder: {res['msg']}\n{res.get('tb', '')}")
        self.fuzz_key = f"{res['type']}@{res.get('where', 'worker')}"


# -- a minimal GGUF (de)serializer for structured edits (trusts its seed) ----------------------------------
def _skip_value(b: bytes, i: int, t: int) -> int:
    if t == 8:
        (n,) = struct.unpack_from("<Q", b, i)
        return i + 8 + n
    if t == 9:
        it, n = struct.unpack_from("<IQ", b, i)
        i += 12
        for _ in range(n):
            i = _skip_value(b, i, it)
        return i
    return i + TYPE_SIZES[t]


def parse(b: bytes) -> dict:
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    i, kvs, tensors, align = 24, [], [], 32
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", b, i)
        key = b[i + 8:i + 8 + n]
        i += 8 + n
        (t,) = struct.unpack_from("<I", b, i)
        j = _skip_value(b, i + 4, t)
        kvs.append([key, t, b[i + 4:j]])
        if key == b"general.alignment":
            align = struct.unpack_from("<I", b, i + 4)[0]
        i = j
    for _ in range(n_t):
        (n,) = struct.unpack_from("<Q", b, i)
        name = b[i + 8:i + 8 + n]
        i += 8 + n
        (nd,) = struct.unpack_from("<I", b, i)
        dims = list(struct.unpack_from(f"<{nd}Q", b, i + 4))
        i += 4 + 8 * nd
        t, off = struct.unpack_from("<IQ", b, i)
        i += 12
        tensors.append({"name": name, "dims": dims, "type": t, "offset": off})
    start = -(-i // align) * align
    return {"version": version, "kvs": kvs, "tensors": tensors, "data": b[start:], "align": align}


def build(g: dict, n_kv=None, n_t=None) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g["version"] & 0xFFFFFFFF,
                                          len(g["tensors"]) if n_t is None else n_t,
                                          len(g["kvs"]) if n_kv is None else n_kv))
    for key, t, raw in g["kvs"]:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", t & 0xFFFFFFFF) + raw
    for t in g["tensors"]:
        out += struct.pack("<Q", len(t["name"])) + t["name"] + struct.pack("<I", len(t["dims"]) & 0xFFFFFFFF)
        out += b"".join(struct.pack("<Q", d % (1 << 64)) for d in t["dims"])
        out += struct.pack("<IQ", t["type"] & 0xFFFFFFFF, t["offset"] % (1 << 64))
    align = g["align"] if g["align"] and not g["align"] & (g["align"] - 1) and g["align"] <= 1 << 16 else 32
    out += bytes(-len(out) % align)
    return bytes(out) + g["data"]


def _scalar(t: int, v: int) -> bytes:
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}[t]
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, float(v))
    size = struct.calcsize(fmt)
    lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if fmt[1].islower() else (0, (1 << 8 * size) - 1)
    return struct.pack(fmt, min(max(v, lo), hi))


def mutate(seed: bytes, src: _common.Source) -> bytes:
    g = parse(seed)
    arch = next((raw[8:].decode() for k, t, raw in g["kvs"] if k == b"general.architecture"), "llama")
    n_kv = n_t = None
    for _ in range(src.int(1, 5)):
        op = src.int(0, 15)
        kv = src.pick(g["kvs"]) if g["kvs"] else None
        ten = src.pick(g["tensors"]) if g["tensors"] else None
        if op == 0 and kv and kv[1] in TYPE_SIZES:                 # an interesting scalar value
            kv[2] = _scalar(kv[1], src.pick(_common.INTERESTING_INTS))
        elif op == 1 and kv:                                        # another value type
            kv[1] = src.pick([*range(14), 0xFFFFFFFF, 9])
        elif op == 2:                                               # set a hyper-parameter llama.cpp reads
            key = f"{arch}.{src.pick(HPARAMS)}".encode()
            t = src.pick([4, 5, 10, 11, 6, 8, 9])
            v = src.pick(_common.INTERESTING_INTS)
            raw = (_scalar(t, v) if t in TYPE_SIZES else struct.pack("<Q", 3) + b"abc" if t == 8
                   else struct.pack("<IQ", 4, src.int(0, 4)) + b"".join(_scalar(4, v) for _ in range(src.int(0, 4))))
            found = [k for k in g["kvs"] if k[0] == key]
            if found and src.bool():
                found[0][1], found[0][2] = t, raw
            else:
                g["kvs"].append([key, t, raw])
        elif op == 3 and kv:                                        # delete or duplicate a pair
            if src.bool():
                g["kvs"].remove(kv)
            else:
                g["kvs"].append(list(kv))
        elif op == 4 and kv and kv[1] == 9 and len(kv[2]) >= 12:    # an array's element type or length
            it, n = struct.unpack_from("<IQ", kv[2])
            if src.bool():
                it = src.pick([*range(13), 99])
            else:
                n = src.pick(_common.INTERESTING_INTS) % (1 << 64)
            kv[2] = struct.pack("<IQ", it, n) + kv[2][12:]
        elif op == 5 and kv and kv[1] == 8 and len(kv[2]) >= 8:     # a string's length
            kv[2] = struct.pack("<Q", src.pick(_common.INTERESTING_INTS) % (1 << 64)) + kv[2][8:]
        elif op == 6:                                               # general.alignment
            g["kvs"] = [k for k in g["kvs"] if k[0] != b"general.alignment"]
            t = src.pick([4, 4, 4, 10, 5])
            a = src.pick([0, 1, 3, 8, 16, 31, 32, 64, 4096, 1 << 20, 2**31, 2**32 - 1])
            g["kvs"].append([b"general.alignment", t, _scalar(t, a)])
            g["align"] = a if t == 4 else g["align"]
        elif op == 7 and ten:                                       # a dimension
            if ten["dims"]:
                ten["dims"][src.int(0, len(ten["dims"]) - 1)] = src.pick(_common.INTERESTING_INTS)
        elif op == 8 and ten:                                       # number of dimensions
            k = src.int(0, 6)
            ten["dims"] = (ten["dims"] + [1] * 6)[:k]
        elif op == 9 and ten:                                       # ggml type
            ten["type"] = src.int(0, 45)
        elif op == 10 and ten:                                      # data offset
            ten["offset"] = src.pick([0, 1, 16, 32, ten["offset"] + 32, ten["offset"] - 32,
                                      *_common.INTERESTING_INTS]) % (1 << 64)
        elif op == 11 and ten:                                      # name
            ten["name"] = src.pick([b"", b"x" * 63, b"x" * 64, b"\xff\xfe", (src.pick(g["tensors"]) or ten)["name"],
                                    b"token_embd.weight", b"output.weight", ten["name"] + b"x"])
        elif op == 12 and ten:                                      # delete, duplicate or swap tensors
            r = src.int(0, 2)
            if r == 0:
                g["tensors"].remove(ten)
            elif r == 1:
                g["tensors"].append(dict(ten))
            else:
                other = src.pick(g["tensors"])
                ten["dims"], other["dims"] = other["dims"], ten["dims"]
        elif op == 13:                                              # counts that lie
            d = src.pick(_common.INTERESTING_INTS)
            if src.bool():
                n_kv = (len(g["kvs"]) + src.pick([-1, 1, d])) % (1 << 64)
            else:
                n_t = (len(g["tensors"]) + src.pick([-1, 1, d])) % (1 << 64)
        elif op == 14:                                              # version
            g["version"] = src.pick([0, 1, 2, 3, 4, 0x03000000, 0xFFFFFFFF])
        elif op == 15:                                              # truncate or extend the data
            if src.bool():
                g["data"] = g["data"][: src.int(0, len(g["data"]))]
            else:
                g["data"] += bytes(src.int(1, 4096))
    out = build(g, n_kv, n_t)
    if src.int(0, 3) == 0:
        out = _common.mutate_bytes(out, src, max_ops=2)
    return out


# -- the llama.cpp helper process -----------------------------------------------------------------------------
def worker() -> None:
    import os

    import numpy as np

    proto = os.fdopen(os.dup(1), "w")       # answers go here; anything native code prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from edgevlm.errors import EdgeVLMError
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    for line in sys.stdin:
        path = line.strip()
        res = {"ok": True}
        try:
            with LlamaCppDecoder(path, n_ctx=16, n_threads=1) as dec:
                e = np.random.default_rng(0).normal(0, 0.02, (3, dec.n_embd)).astype(np.float32)
                logits = dec.prefill(e)
                dec.step(int(np.argmax(logits)) % max(1, dec.n_vocab))
        except EdgeVLMError as e:
            res = {"ok": False, "edgevlm": True, "msg": str(e)[:300]}
        except BaseException as e:                   # noqa: BLE001 - reported to the harness as a finding
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "/edgevlm/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "worker"
            res = {"ok": False, "edgevlm": False, "type": type(e).__name__, "msg": str(e)[:300],
                   "tb": traceback.format_exc()[-3000:], "where": where}
        proto.write(json.dumps(res) + "\n")
        proto.flush()


class Worker:
    TIMEOUT_S = 60

    def __init__(self):
        self.p = None

    def run(self, path: Path):
        """The helper's answer, or ("crash", why) when it died or hung."""
        if self.p is None or self.p.poll() is not None:
            self.err = _common.work_dir() / "llama-worker.err"
            self.p = subprocess.Popen([sys.executable, __file__, "--llama-worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self.err.open("wb"), text=True, bufsize=1)
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], self.TIMEOUT_S)
        line = self.p.stdout.readline() if ready else ""
        if line.startswith("{"):
            return json.loads(line)
        if not ready:
            self.p.kill()
            self.p.wait()
            why = f"llama.cpp hung for over {self.TIMEOUT_S} s"
        else:
            self.p.kill() if line else None
            rc = self.p.wait()
            why = f"llama.cpp died (exit {rc}{', signal ' + str(-rc) if rc < 0 else ''})"
        self.p = None
        said = [line.split("/llama.cpp/")[-1] for line in self.err.read_text(errors="replace").splitlines()
                if "GGML_ASSERT" in line or "GGML_ABORT" in line or "error" in line.lower()]
        return ("crash", why + " on a GGUF that read_gguf_header accepted" + (f": {said[-1][:160]}" if said else ""))


def _seed_gguf() -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer, written by edgevlm's GGUF writer (cached)."""
    path = _common.cache_dir() / "tiny-llama-v1.gguf"
    if path.is_file():
        return path
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgevlm.exporters.gguf import write_gguf
    from edgevlm.processor import TextTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=272, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "how many circles are in the picture"] * 10, trainer)
    tt = TextTokenizer(tok, tok.token_to_id("<s>"), (tok.token_to_id("</s>"),), "fuzz-bpe")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=tt.vocab_size, max_position_embeddings=64)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    tmp = path.with_suffix(".part.gguf")
    write_gguf(lm, tt, tmp)
    tmp.rename(path)
    return path


def load():
    from edgevlm.errors import EdgeVLMError
    from edgevlm.runtime.gguf_header import read_gguf_header

    try:
        import llama_cpp  # noqa: F401
        worker_ = Worker()
    except ImportError:                  # no llama.cpp here: fuzz the header reader alone
        worker_ = None
    seed = _seed_gguf().read_bytes()
    return {"read": read_gguf_header, "Edge": EdgeVLMError, "seed": seed, "worker": worker_,
            "path": _common.work_dir() / "decoder.gguf"}


def one_input(ctx, data: bytes, rec) -> None:
    b = mutate(ctx["seed"], _common.Source(data[1:])) if data[:1] == b"\x01" else data
    path = ctx["path"]
    path.write_bytes(b)
    try:
        ctx["read"](path)
    except ctx["Edge"]:
        rec.count("header refused")
        return
    rec.count("header accepted")
    if ctx["worker"] is None:
        return
    res = ctx["worker"].run(path)
    if isinstance(res, tuple):
        rec.crash(res[1], b)
    elif not res["ok"] and not res["edgevlm"]:
        raise WorkerError(res)
    else:
        rec.count("llama.cpp ran it" if res["ok"] else "llama.cpp refused it (EdgeVLMError)")


def seeds(ctx, folder: Path) -> None:
    (folder / "tiny-llama.gguf").write_bytes(ctx["seed"])
    (folder / "structured").write_bytes(b"\x01" + bytes(range(256)))


TARGET = _common.Target("gguf", load, one_input, seeds, max_len=1 << 17, timeout_s=180)

if __name__ == "__main__":
    if sys.argv[1:] == ["--llama-worker"]:
        sys.path.insert(0, str(_common.REPO))
        worker()
    else:
        sys.exit(_common.main(TARGET))
