"""edgevlm's local demo: drop an image, ask, watch the answer stream, and see what it costs.

It runs bundles with the torch-free runtime (``edgevlm.runtime``: ONNX Runtime, llama.cpp), so what
it shows is what the device will run — never eager PyTorch.

    edgevlm demo                                  # the default model's bundle, exported on first use
    edgevlm demo bundles/a-int8 bundles/a-int4    # several: pick one, or compare them side by side
    python apps/gradio/app.py bundles/a-int8      # the same from a checkout

Where it lives: apps are consumers of the library, so the code sits in ``apps/gradio/`` and uses only
edgevlm's public API (``runtime``, ``bundle``, ``data``, ``errors``). The wheel ships this folder as the
package ``edgevlm._demo`` (pyproject.toml maps it, as it maps models/ to ``edgevlm._zoo``), which is
how ``edgevlm demo`` finds it in a wheel and in a checkout alike. The file imports nothing relative,
so it also runs as a script.

Safe by default: it binds 127.0.0.1 and never shares; uploads are capped (gradio's ``max_file_size``
and a check here) and accepted only when their content is a PNG, JPEG, WebP, BMP or GIF that decodes
within edgevlm's pixel limit (decompression bombs are refused before anything decodes them); the
queue is bounded, and model calls run one at a time (``concurrency``).

Each answer shows time to first token, tokens/s and peak memory; the bundle's manifest facts
(target, precision, size, parity and accuracy recorded at export) sit beside the picker.
"""
from __future__ import annotations

import html
import os
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image, ImageDraw

from edgevlm import runtime
from edgevlm.bundle import read_manifest
from edgevlm.data.images import load_image
from edgevlm.data.scenes import parse_boxes, parse_points
from edgevlm.errors import ConfigError, EdgeVLMError, ImageError
from edgevlm.runtime.bench import peak_rss_mib, rss_mib

LOCALHOST = "127.0.0.1"          # the demo never listens on other interfaces
AUTO = "auto"                    # the backend the bundle itself names first
MAX_QUESTION_CHARS = 500
MAX_NEW_TOKENS = 256
IMAGE_FORMATS = "PNG, JPEG, WebP, BMP or GIF"
EXAMPLE_QUESTIONS = ["describe the image.", "how many circles are there?", "what color is the square?",
                     "What colour is the circle?", "Is there a blue star", "detect circle", "point to the star"]
COMPARE_COLUMNS = ["bundle", "backend", "answer", "TTFT / latency (ms)", "tok/s", "peak RSS (MiB)", "precision",
                   "size (MB)"]


# ---------------------------------------------------------------------------------------------------
# Bundles and inference (no gradio in this half)
# ---------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where the demo keeps bundles it exported: $EDGEVLM_CACHE, else $XDG_CACHE_HOME/edgevlm, else
    ~/.cache/edgevlm."""
    if os.environ.get("EDGEVLM_CACHE"):
        return Path(os.environ["EDGEVLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edgevlm"


def default_bundle(quiet: bool = False) -> Path:
    """The embedded default model as a cpu INT8 bundle, exported into :func:`cache_dir` on first use
    (with the export's progress on stderr) and reused afterwards."""
    from edgevlm.zoo import DEFAULT_MODEL, is_vlm

    out = cache_dir() / "bundles" / f"{DEFAULT_MODEL}-cpu-int8"
    if (out / "manifest.json").is_file():
        try:
            read_manifest(out)
            return out
        except EdgeVLMError:        # written by another edgevlm version: export it again
            pass
    if not quiet:
        print(f"edgevlm demo: exporting the default model {DEFAULT_MODEL} to {out} (first use only)",
              file=sys.stderr, flush=True)
    if is_vlm(DEFAULT_MODEL):
        from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle

        export_vlm_bundle(VLMExportConfig(model=DEFAULT_MODEL, target="cpu", precision="int8", out=str(out),
                                          overwrite=True), quiet=quiet)
    else:
        from edgevlm.build import export_bundle
        from edgevlm.config import ExportConfig, QuantConfig

        export_bundle(ExportConfig(model=DEFAULT_MODEL, target="cpu", quant=QuantConfig(precision="int8"), out=out,
                                   overwrite=True), quiet=quiet)
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def _num(x, fmt: str = ".3g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


@dataclass
class BundleInfo:
    """A bundle on disk, by its manifest: what the picker, the facts panel and the compare table show."""

    path: Path
    manifest: dict
    label: str

    @property
    def is_vlm(self) -> bool:
        return self.manifest.get("task") == "vlm"

    @property
    def backends(self) -> list[str]:
        """The backends this bundle can run on: its decoders (VLMs) or its format's runtime."""
        if self.is_vlm:
            parts = self.manifest.get("parts", {})
            return [b for b, key in (("onnxruntime", "decoder"), ("llama.cpp", "decoder_gguf")) if key in parts]
        return [self.manifest.get("target", {}).get("runtime") or "onnxruntime"]

    @property
    def size_mb(self) -> float:
        return sum(f.get("size", 0) for f in self.manifest.get("files", {}).values()) / 1e6

    def facts(self) -> list[tuple[str, str]]:
        """(fact, value) rows from the manifest; tolerant of keys a manifest does not have."""
        m = self.manifest
        model, target = m.get("model", {}), m.get("target", {})
        what = f"{model.get('name', '?')} ({model.get('family', '?')}, {_num(model.get('params', 0) / 1e6)} M params"
        if self.is_vlm and "vision_tokens" in model:
            what += f", {model['vision_tokens']} vision tokens"
        rows = [("bundle", str(self.path)), ("task", m.get("task", "?")), ("model", what + ")"),
                ("weights", str(m.get("weights", {}).get("source", "-"))),
                ("target", f"{target.get('name', '?')} — {target.get('description', '')} ({target.get('format', '?')})"),
                ("precision", str(m.get("precision", "?"))), ("size", f"{self.size_mb:.2f} MB"),
                ("backends", ", ".join(self.backends))]
        if self.is_vlm:
            parts = m.get("parts", {})
            rows.append(("parts", ", ".join(f"{k} {v.get('precision', '?')}" for k, v in parts.items())))
            for r in m.get("parity", {}).get("results", []):
                same = ("same greedy tokens as eager" if r.get("same_greedy_tokens")
                        else f"diverges from eager at token {r.get('first_divergence')}")
                rows.append((f"parity ({r.get('backend')} {r.get('precision')})",
                             f"{same}; top-1 {_pct(r.get('teacher_forced_top1_agreement'))} teacher-forced; "
                             f"KL {_num(r.get('kl_mean'))}"))
        else:
            for art in m.get("artifacts", [])[:1]:
                par = art.get("parity", {})
                rows.append(("parity", f"max |diff| {_num(par.get('max_abs_diff'))} vs eager (scale "
                             f"{_num(par.get('output_scale'))}), top-1 agreement {_pct(par.get('top1_agreement'))}"))
        acc = m.get("accuracy", {})
        if "bundle" in acc:
            rows.append(("accuracy", f"{acc.get('metric', 'accuracy')} {_pct(acc['bundle'])} on {acc.get('dataset', '?')} "
                         f"{acc.get('split', '')} ({acc.get('images', '?')} images); eager FP32 "
                         f"{_pct(acc.get('eager_fp32'))}"))
        else:
            rows.append(("accuracy", f"{acc.get('status', 'not recorded')}" + (f" — {acc['reason']}" if "reason" in acc else "")))
        return rows

    def facts_markdown(self) -> str:
        return "\n".join(f"- **{k}**: {v}" for k, v in self.facts())


def read_bundles(paths) -> list[BundleInfo]:
    """Read each bundle's manifest (clear errors for a bad path); label them by folder name, or by the
    whole path when two folders share a name."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no bundle to serve", "pass a bundle directory made by `edgevlm export`")
    manifests = [read_manifest(p) for p in paths]
    names = [p.name for p in paths]
    return [BundleInfo(p, m, p.name if names.count(p.name) == 1 else str(p)) for p, m in zip(paths, manifests)]


@dataclass
class _Loaded:
    obj: object                      # runtime.Classifier or VLMPipeline
    load_s: float
    rss_added_mib: float
    lock: threading.Lock = field(default_factory=threading.Lock)   # a VLM's decoder holds one KV cache


def sniff_image_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, if it is one the demo accepts."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def vet_image_file(path, name: str, max_bytes: int) -> None:
    """Refuse an upload that is too large, is not an image by content, or would decode to too many
    pixels (a decompression bomb): raises ImageError naming the upload, before anything decodes it
    unguarded."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{name} is {size / 2**20:.1f} MiB, over this demo's upload limit of "
                         f"{max_bytes / 2**20:.0f} MiB", "upload a smaller image (or start the demo with --max-upload-mb)")
    with open(path, "rb") as f:
        head = f.read(16)
    if sniff_image_format(head) is None:
        raise ImageError(f"{name} is not an image this demo accepts (by its content)", f"upload a {IMAGE_FORMATS} file")
    try:
        load_image(path)        # Pillow's decompression-bomb guard, as an error, and edgevlm's size limits
    except ImageError as e:
        raise ImageError(e.problem.replace(str(path), name), e.fix) from None


class Runner:
    """Loads bundles on first use (once per bundle and backend) and runs them: the demo's only path to a
    model. Every answer comes back with its cost."""

    def __init__(self, bundles: list[BundleInfo], decoder: str | None = None):
        self.bundles = {b.label: b for b in bundles}
        self.decoder = decoder
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._load_lock = threading.Lock()

    def info(self, label: str) -> BundleInfo:
        if label not in self.bundles:
            raise ConfigError(f"no bundle called {label!r} in this demo", f"pick one of: {', '.join(self.bundles)}")
        return self.bundles[label]

    def targets(self) -> dict[str, tuple[str, str]]:
        """Compare choices: every bundle on each of its backends ("label · backend" when it has several)."""
        out = {}
        for b in self.bundles.values():
            for be in b.backends:
                out[b.label if len(b.backends) == 1 else f"{b.label} · {be}"] = (b.label, be)
        return out

    def resolve_backend(self, info: BundleInfo, backend: str | None) -> str:
        if backend in (None, "", AUTO):
            if info.is_vlm and self.decoder in info.backends:
                return self.decoder
            return info.backends[0]
        if backend not in info.backends:
            raise ConfigError(f"{info.label} cannot run on {backend} (it has: {', '.join(info.backends)})",
                              f"pick {AUTO} or one of: {', '.join(info.backends)}")
        return backend

    def load(self, label: str, backend: str | None = None) -> tuple[BundleInfo, str, _Loaded]:
        info = self.info(label)
        be = self.resolve_backend(info, backend)
        with self._load_lock:
            key = (label, be)
            if key not in self._loaded:
                base, t = rss_mib(), time.perf_counter()
                kw = {"decoder": be} if info.is_vlm else {"backend": be}
                obj = runtime.load(info.path, **kw)          # verifies checksums first
                self._loaded[key] = _Loaded(obj, time.perf_counter() - t, max(0.0, rss_mib() - base))
            return info, be, self._loaded[key]

    def _stats(self, info: BundleInfo, be: str, loaded: _Loaded, **kw) -> dict:
        return {"bundle": info.label, "backend": be, "precision": info.manifest.get("precision"),
                "target": info.manifest.get("target", {}).get("name"), "size_mb": round(info.size_mb, 2), **kw,
                "peak_rss_mib": round(peak_rss_mib(), 1), "rss_mib": round(rss_mib(), 1),
                "bundle_load_s": round(loaded.load_s, 3), "bundle_rss_mib": round(loaded.rss_added_mib, 1)}

    def stream_answer(self, image, question: str, label: str, backend: str | None = None,
                      max_new_tokens: int = 64, temperature: float = 0.0):
        """Yields (answer so far, None) per piece, then (answer, stats) once the answer is complete."""
        question = (question or "").strip()
        if not question:
            raise ConfigError("the question is empty", "type a question, e.g. 'describe the image.'")
        if len(question) > MAX_QUESTION_CHARS:
            raise ConfigError(f"the question has {len(question)} characters", f"keep it under {MAX_QUESTION_CHARS}")
        if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens={max_new_tokens}", f"ask for 1 to {MAX_NEW_TOKENS} new tokens")
        if not self.info(label).is_vlm:
            raise ConfigError(f"{label} is an image classifier; it answers no questions",
                              "classify with it, or pick a vision-language bundle")
        info, be, loaded = self.load(label, backend)
        vlm = loaded.obj
        text = ""
        with loaded.lock:
            pieces = vlm.generate(image, question, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  stream=True)
            with closing(pieces):       # a stopped answer closes the runtime's stream (it resets its cache)
                for piece in pieces:
                    text += piece
                    yield text, None
            st = vlm.last_stats
        yield text, self._stats(info, be, loaded, new_tokens=st.new_tokens, prompt_tokens=st.prompt_tokens,
                                image_tokens=st.image_tokens, ttft_ms=round(st.time_to_first_token_s * 1000, 1),
                                tokens_per_s=round(st.decode_tokens_per_s, 1), stopped_by=st.stopped_by)

    def classify(self, image, label: str, backend: str | None = None, top_k: int = 5):
        """(predictions, stats) for a classification bundle."""
        if image is None:
            raise ConfigError("no image", "upload an image or pick an example")
        if self.info(label).is_vlm:
            raise ConfigError(f"{label} is a vision-language bundle", "ask it a question instead")
        info, be, loaded = self.load(label, backend)
        t = time.perf_counter()
        preds = loaded.obj.classify(image, top_k=max(1, int(top_k)))
        return preds, self._stats(info, be, loaded, latency_ms=round((time.perf_counter() - t) * 1000, 2))


def cost_line(stats: dict) -> str:
    """Time to first token, tokens/s (or latency, for classifiers) and peak memory of one answer."""
    if "ttft_ms" in stats:
        head = f"{stats['ttft_ms']:.0f} ms to first token · {stats['tokens_per_s']:.1f} tokens/s"
    else:
        head = f"{stats['latency_ms']:.1f} ms per image"
    return f"{head} · peak RSS {stats['peak_rss_mib']:.0f} MiB"


def bundle_line(stats: dict) -> str:
    tokens = (f"{stats['new_tokens']} new tokens after {stats['image_tokens']} image + {stats['prompt_tokens']} "
              f"prompt tokens (stopped by {stats['stopped_by']}); " if "new_tokens" in stats else "")
    return (f"{tokens}{stats['bundle']} ({stats['precision']}, {stats['target']}, {stats['size_mb']:.2f} MB) on "
            f"{stats['backend']}; bundle loaded in {stats['bundle_load_s']:.2f} s, +{stats['bundle_rss_mib']:.0f} MiB")


def stats_message(stats: dict) -> dict:
    """The chat's footnote to an answer: its cost as the title, the bundle behind it inside."""
    return {"role": "assistant", "content": bundle_line(stats), "metadata": {"title": cost_line(stats), "status": "done"}}


def stats_markdown(stats: dict) -> str:
    return f"**{cost_line(stats)}** — {bundle_line(stats)}"


def describe_predictions(preds) -> str:
    return " · ".join(f"{p.label} {100 * p.score:.1f}%" for p in preds)


_COLORS = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255), (255, 255, 255)]


def draw_grounding(image, answer: str, min_side: int = 384) -> Image.Image | None:
    """The image with the answer's ``<box>``es and ``<point>``s (0..1 coordinates) drawn on a copy,
    upscaled so small images stay legible; None when the answer grounds nothing."""
    boxes, points = parse_boxes(answer), parse_points(answer)
    if image is None or not (boxes or points):
        return None
    img = load_image(image)
    scale = max(1, -(-min_side // min(img.size)))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img.copy()
    w, h = img.size
    draw, lw = ImageDraw.Draw(img), max(2, min(w, h) // 128)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c = _COLORS[i % len(_COLORS)]
        draw.rectangle([x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)], outline=c, width=lw)
        draw.text((x0 * w + lw + 1, y0 * h + lw), str(i + 1), fill=c)
    r = max(4, min(w, h) // 64)
    for i, (x, y) in enumerate(points):
        c = _COLORS[i % len(_COLORS)]
        draw.ellipse([x * w - r, y * h - r, x * w + r, y * h + r], fill=c, outline=(0, 0, 0), width=max(1, lw // 2))
    return img


MAX_EXAMPLES = 20      # the zoo ships 18: 4 scenes, 4 drawn pictures, 10 digits (one gallery page)


def sample_images() -> list[Path]:
    """The zoo's sample images as examples: the generator's scenes, then pictures as a person draws them (the
    drawn split's first scenes: plain backgrounds, other sizes), then digits."""
    from edgevlm.resources import zoo_dir

    folder = zoo_dir() / "samples"
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    order = ("scene", "drawn")
    return sorted(files, key=lambda p: (next((i for i, o in enumerate(order) if p.name.startswith(o)), len(order)),
                                        p.name))[:MAX_EXAMPLES]


# ---------------------------------------------------------------------------------------------------
# The UI
# ---------------------------------------------------------------------------------------------------

def vetted(image: gr.Image, max_bytes: int) -> gr.Image:
    """Make ``image`` vet each upload (size, image type by content, pixel count) before gradio or the runtime
    decodes it; a refused upload becomes a clear error in the app and for API clients.

    It wraps this one component's ``preprocess`` rather than subclassing gr.Image: gradio writes a ``.pyi``
    stub next to the module of every component subclass, which a wheel's site-packages must not get."""
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is not None:
            if payload.path is None:
                raise gr.Error("upload the image as a file (inline data is not accepted)", title="Upload refused",
                               print_exception=False)
            try:
                vet_image_file(payload.path, payload.orig_name or Path(payload.path).name, max_bytes)
            except ImageError as e:
                raise gr.Error(str(e), title="Upload refused", print_exception=False) from None
        return gradio_preprocess(payload)

    image.preprocess = preprocess
    return image


def _error(e: EdgeVLMError) -> gr.Error:
    """An error the user can act on, shown in the app (and to API clients) without a traceback."""
    return gr.Error(str(e), title=type(e).__name__, print_exception=False)


def _display(text: str) -> str:
    """A model's answer as chat text: the chatbot renders HTML, and ``<box>``/``<point>`` must show as typed."""
    return html.escape(text, quote=False)


def _bars(preds):
    import pandas as pd

    return pd.DataFrame({"label": [p.label for p in preds], "probability": [round(p.score, 4) for p in preds]})


# every model call shares one concurrency group (one at a time by default); UI bookkeeping stays off the API
_RUN = {"concurrency_id": "runtime"}
_PRIVATE = {"api_visibility": "private"}
_QUICK = {"concurrency_limit": None, **_PRIVATE}     # UI bookkeeping: never waits behind a model call


def _backend_choices(info: BundleInfo) -> list[str]:
    """The backend picker's choices for one bundle: auto, then its own backends."""
    return [AUTO] + info.backends


def _sidebar(infos: list[BundleInfo], examples, max_upload_mb: float) -> SimpleNamespace:
    """The left column: the image, example images, the bundle and backend pickers, generation settings, facts."""
    first = infos[0]
    labels = [b.label for b in infos]
    all_backends = [AUTO] + sorted({be for b in infos for be in b.backends})
    max_bytes = int(max_upload_mb * 2**20)
    image = vetted(gr.Image(label=f"Image ({IMAGE_FORMATS}, up to {max_upload_mb:g} MiB)", type="filepath",
                            image_mode=None, sources=["upload", "clipboard"], height=300, elem_id="image"),
                   max_bytes)
    if examples:
        gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example images",
                    examples_per_page=MAX_EXAMPLES)
    bundle = gr.Dropdown(labels, value=first.label, label="Bundle", elem_id="bundle")
    # every backend of every bundle, so API callers may name any; the page narrows it per bundle
    backend = gr.Dropdown(all_backends, value=AUTO, label="Backend", elem_id="backend",
                          info="auto: the bundle's first decoder (or --decoder-backend)")
    with gr.Accordion("Generation", open=False):
        max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        top_k = gr.Slider(1, 10, value=5, step=1, label="Top-k labels (classifiers)")
    with gr.Accordion("Bundle facts (from its manifest)", open=True):
        facts = gr.Markdown(first.facts_markdown(), elem_id="facts")
    return SimpleNamespace(image=image, bundle=bundle, backend=backend, max_new=max_new, temperature=temperature,
                           top_k=top_k, facts=facts)


def _chat_tab(first: BundleInfo) -> SimpleNamespace:
    """The Chat tab: the conversation, the question box and its buttons, the cost line, boxes/points and top-k bars."""
    chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chat", render_markdown=False,
                         allow_tags=False, buttons=["copy"], feedback_options=None)
    with gr.Row():
        question = gr.Textbox(placeholder="Ask about the image (classifiers: just press Ask)",
                              show_label=False, scale=6, max_length=MAX_QUESTION_CHARS,
                              elem_id="question", submit_btn=False)
        send = gr.Button("Ask", variant="primary", scale=1, min_width=70, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
        clear = gr.Button("Clear", scale=1, min_width=70, elem_id="clear")
    gr.Examples([[q] for q in EXAMPLE_QUESTIONS], inputs=[question],
                label="Questions (Moondream-style skills: 'detect X' draws boxes, "
                "'point to X' draws points)")
    stats = gr.Markdown(elem_id="stats")
    grounding = gr.Image(label="Boxes and points from the last answer", type="pil", format="png",
                         interactive=False, visible=first.is_vlm, height=300, elem_id="grounding")
    bars = gr.BarPlot(x="label", y="probability", y_lim=[0, 1], sort="-y", label="Top-k labels",
                      visible=not first.is_vlm, elem_id="bars")
    return SimpleNamespace(chatbot=chatbot, question=question, send=send, stop=stop, clear=clear, stats=stats,
                           grounding=grounding, bars=bars)


def _compare_tab(targets: dict) -> SimpleNamespace:
    """The Compare tab: which bundles and backends, the question, the buttons, the table and the gallery."""
    gr.Markdown("The same image and question on several bundles or backends, one after another.")
    compare_targets = gr.CheckboxGroup(list(targets), value=list(targets)[:2],
                                       label="Bundles and backends", elem_id="compare-targets")
    compare_question = gr.Textbox(value=EXAMPLE_QUESTIONS[0], label="Question (VLM bundles)",
                                  max_length=MAX_QUESTION_CHARS, elem_id="compare-question")
    with gr.Row():
        compare_btn = gr.Button("Compare", variant="primary", scale=3, elem_id="compare")
        compare_stop = gr.Button("Stop", variant="stop", scale=1, elem_id="compare-stop")
    table = gr.Dataframe(headers=COMPARE_COLUMNS, interactive=False, wrap=True,
                         elem_id="compare-table")
    gallery = gr.Gallery(label="Boxes and points per bundle", columns=3, height=260, visible=False)
    return SimpleNamespace(targets=compare_targets, question=compare_question, button=compare_btn,
                           stop=compare_stop, table=table, gallery=gallery)


def _api_outputs() -> SimpleNamespace:
    """Hidden API-only outputs: gradio_client callers get plain values, not the chat's display state."""
    with gr.Row(visible=False):
        api_trigger = gr.Button("api")
        api_answer, api_stats = gr.Textbox(label="answer"), gr.JSON(label="stats")
        api_label, api_preds = gr.Textbox(label="label"), gr.JSON(label="predictions")
        api_bundles = gr.JSON(label="bundles")
    return SimpleNamespace(trigger=api_trigger, answer=api_answer, stats=api_stats, label=api_label,
                           preds=api_preds, bundles=api_bundles)


def _chat_handlers(runner: Runner) -> SimpleNamespace:
    """The page's own handlers: picking a bundle, a new or refused image, and a question in the chat."""
    def on_bundle(label):
        info = runner.info(label)
        return (gr.update(choices=_backend_choices(info), value=AUTO), info.facts_markdown(),
                gr.update(visible=info.is_vlm), gr.update(visible=not info.is_vlm))

    def on_image():
        return [], "", None          # a new image starts a new conversation

    def on_upload(_img):
        return None                  # vetted() has checked the file by now

    def chat(img, q, history, label, be, n_new, temp, k):
        q = (q or "").strip()
        history = list(history or [])
        try:
            info = runner.info(label)
            if not info.is_vlm:
                preds, st = runner.classify(img, label, be, k)
                history += [{"role": "user", "content": q or "(classify the image)"},
                            {"role": "assistant", "content": describe_predictions(preds)}, stats_message(st)]
                yield history, "", stats_markdown(st), None, _bars(preds)
                return
            if img is None and not q:
                raise ConfigError("no image and no question", "upload an image and type a question")
            history += [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
            cleared = False             # empty the question box once, not under a follow-up being typed
            for text, st in runner.stream_answer(img, q, label, be, n_new, temp):
                history[-1] = {"role": "assistant", "content": _display(text)}
                if st is None:
                    yield history, gr.skip() if cleared else "", "", gr.skip(), gr.skip()
                    cleared = True
            history.append(stats_message(st))
            yield history, gr.skip() if cleared else "", stats_markdown(st), draw_grounding(img, text), gr.skip()
        except EdgeVLMError as e:
            raise _error(e) from None

    return SimpleNamespace(on_bundle=on_bundle, on_image=on_image, on_upload=on_upload, chat=chat)


def _api_handlers(runner: Runner, infos: list[BundleInfo], targets: dict) -> SimpleNamespace:
    """The handlers callers reach by name: answer, classify, compare (also the Compare tab's) and bundles."""
    def answer_api(image, question, bundle, backend, max_new_tokens, temperature):
        """Answer a question about an image with a VLM bundle (streams; the last value is the whole
        answer). Returns (answer, stats: TTFT, tokens/s, peak RSS, bundle facts)."""
        try:
            for text, st in runner.stream_answer(image, question, bundle, backend, max_new_tokens, temperature):
                yield text, st or {}
        except EdgeVLMError as e:
            raise _error(e) from None

    def classify_api(image, bundle, backend, top_k):
        """Classify an image with a classification bundle. Returns (top label, [{label, index, score}], stats)."""
        try:
            preds, st = runner.classify(image, bundle, backend, top_k)
        except EdgeVLMError as e:
            raise _error(e) from None
        return preds[0].label, [p.__dict__ for p in preds], st

    def compare(img, q, chosen, n_new, temp):
        rows, shots = [], []
        if not chosen:
            raise gr.Error("pick at least one bundle to compare", print_exception=False)
        try:
            for name in chosen:
                if name not in targets:
                    raise ConfigError(f"no compare choice called {name!r}", f"pick from: {', '.join(targets)}")
                label, be = targets[name]
                if runner.info(label).is_vlm:
                    text, st = "", {}
                    for text, st in runner.stream_answer(img, q, label, be, n_new, temp):
                        pass
                    rows.append([label, be, text, st["ttft_ms"], st["tokens_per_s"], st["peak_rss_mib"],
                                 st["precision"], st["size_mb"]])
                    drawn = draw_grounding(img, text)
                    if drawn is not None:
                        shots.append((drawn, f"{name}: {text[:80]}"))
                else:
                    preds, st = runner.classify(img, label, be, 3)
                    rows.append([label, be, describe_predictions(preds), st["latency_ms"], None,
                                 st["peak_rss_mib"], st["precision"], st["size_mb"]])
                yield rows, gr.update(value=shots, visible=bool(shots))
        except EdgeVLMError as e:
            raise _error(e) from None

    def bundles_api():
        """The bundles this demo serves: label, task, backends and manifest facts."""
        return [{"label": b.label, "task": b.manifest.get("task"), "backends": b.backends,
                 "facts": dict(b.facts())} for b in infos]

    return SimpleNamespace(answer_api=answer_api, classify_api=classify_api, compare=compare, bundles_api=bundles_api)


def _wire_chat(demo: gr.Blocks, side: SimpleNamespace, chat: SimpleNamespace, h: SimpleNamespace) -> None:
    """Connect the bundle picker, the image and the chat's buttons to their handlers."""
    outputs = [side.backend, side.facts, chat.grounding, chat.bars]
    side.bundle.change(h.on_bundle, [side.bundle], outputs, queue=False, **_PRIVATE)
    demo.load(h.on_bundle, [side.bundle], outputs, queue=False, **_PRIVATE)
    side.image.change(h.on_image, None, [chat.chatbot, chat.stats, chat.grounding], **_QUICK)
    side.image.upload(h.on_upload, [side.image], None, **_QUICK).failure(lambda: None, None, [side.image],
                                                                         **_QUICK)  # refused: drop it
    asked = gr.on([chat.send.click, chat.question.submit], h.chat,
                  [side.image, chat.question, chat.chatbot, side.bundle, side.backend, side.max_new, side.temperature,
                   side.top_k],
                  [chat.chatbot, chat.question, chat.stats, chat.grounding, chat.bars], **_RUN, **_PRIVATE)
    chat.stop.click(None, None, None, cancels=[asked], queue=False, **_PRIVATE)
    chat.clear.click(lambda: ([], "", None), None, [chat.chatbot, chat.stats, chat.grounding], queue=False,
                     **_PRIVATE)


def _wire_compare_and_api(side: SimpleNamespace, chat: SimpleNamespace, cmp: SimpleNamespace,
                          api: SimpleNamespace, h: SimpleNamespace) -> None:
    """Connect the Compare tab and the named API endpoints (answer, classify, compare, bundles)."""
    compared = cmp.button.click(h.compare, [side.image, cmp.question, cmp.targets, side.max_new, side.temperature],
                                [cmp.table, cmp.gallery], api_name="compare", **_RUN)
    cmp.stop.click(None, None, None, cancels=[compared], queue=False, **_PRIVATE)
    api.trigger.click(h.answer_api, [side.image, chat.question, side.bundle, side.backend, side.max_new,
                                     side.temperature], [api.answer, api.stats], api_name="answer", **_RUN)
    api.trigger.click(h.classify_api, [side.image, side.bundle, side.backend, side.top_k],
                      [api.label, api.preds, api.stats], api_name="classify", **_RUN)
    api.trigger.click(h.bundles_api, None, [api.bundles], api_name="bundles", queue=False)


def build_app(bundles, *, decoder: str | None = None, max_upload_mb: float = 10,
              examples: list | None = None) -> gr.Blocks:
    """The demo as a gr.Blocks (not launched). ``bundles``: bundle directories; ``decoder``: the VLM decoder
    backend to start with ("onnxruntime" or "llama.cpp", where a bundle has it)."""
    infos = read_bundles(bundles)
    runner = Runner(infos, decoder=decoder)
    targets = runner.targets()
    examples = sample_images() if examples is None else examples

    # delete_cache: gradio keeps every upload on disk while the demo runs (bad ones too, since they are checked after
    # gradio stored them); drop those older than an hour, checked every 10 minutes (the soak benchmark found it).
    with gr.Blocks(title="edgevlm demo", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown("## edgevlm demo\nAnswers come from the bundle itself through `edgevlm.runtime` (ONNX Runtime or "
                    "llama.cpp, no PyTorch): what you see is what the device runs. Each question about an image is "
                    "answered on its own; the conversation stays visible.")
        with gr.Row():
            with gr.Column(scale=2):
                side = _sidebar(infos, examples, max_upload_mb)
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat"):
                        chat = _chat_tab(infos[0])
                    with gr.Tab("Compare"):
                        cmp = _compare_tab(targets)
        api = _api_outputs()
        _wire_chat(demo, side, chat, _chat_handlers(runner))
        _wire_compare_and_api(side, chat, cmp, api, _api_handlers(runner, infos, targets))
    demo.runner = runner           # for callers that want the loaded bundles (tests, notebooks)
    demo.example_files = [str(Path(p).resolve()) for p in examples or []]    # launch() lets gradio serve these
    return demo


def launch(bundles=None, *, port: int | None = None, decoder: str | None = None, max_upload_mb: float = 10,
           concurrency: int = 1, queue_size: int = 16, open_browser: bool = False, block: bool = True,
           quiet: bool = False):
    """Build and serve the demo on 127.0.0.1 (never shared). ``bundles`` defaults to the default model's
    bundle (exported on first use). ``block=False`` returns at once with (app, url); call ``app.close()``."""
    if concurrency < 1 or queue_size < 1:
        raise ConfigError(f"concurrency={concurrency}, queue size={queue_size}", "use positive numbers")
    if not 0 < max_upload_mb <= 200:
        raise ConfigError(f"max upload {max_upload_mb} MiB", "use a limit between 1 and 200 MiB")
    app = build_app(list(bundles) if bundles else [default_bundle(quiet=quiet)], decoder=decoder,
                    max_upload_mb=max_upload_mb)
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency, api_open=False)
    try:
        _, url, _ = app.launch(server_name=LOCALHOST, server_port=port, share=False, inbrowser=open_browser,
                               # bytes, as vetted() counts them: gradio's "<n>mb" takes integers only, and
                               # --max-upload-mb is a float ("10.0mb" failed to parse)
                               max_file_size=int(max_upload_mb * 2**20), prevent_thread_lock=True, show_error=True,
                               allowed_paths=app.example_files,        # these files only, not their folders
                               quiet=True, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
                               footer_links=["api"])
    except OSError as e:
        raise ConfigError(f"cannot serve on {LOCALHOST}:{port or '7860+'} ({e})", "pick another --port") from None
    if not quiet:
        print(f"edgevlm demo: {len(app.runner.bundles)} bundle(s) on {url} (this machine only; Ctrl+C stops)",
              file=sys.stderr, flush=True)
    if block:
        app.block_thread()          # until Ctrl+C, then closes the server
    return app, url


def main(argv=None) -> int:
    """``python apps/gradio/app.py [BUNDLE ...]``: the same as ``edgevlm demo``."""
    from edgevlm.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
