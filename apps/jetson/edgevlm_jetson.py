#!/usr/bin/env python3
"""Ask a VLM bundle about camera frames, an RTSP stream or a folder of images, with per-frame latency.

    python apps/jetson/edgevlm_jetson.py BUNDLE --images DIR   [--prompt Q] [--json]
    python apps/jetson/edgevlm_jetson.py BUNDLE --camera 0     [--every 30] [--max-frames 100]
    python apps/jetson/edgevlm_jetson.py BUNDLE --camera csi   (a CSI camera through nvarguscamerasrc)
    python apps/jetson/edgevlm_jetson.py BUNDLE --camera 'v4l2src ! ... ! appsink'   (any GStreamer pipeline)
    python apps/jetson/edgevlm_jetson.py BUNDLE --rtsp rtsp://HOST:8554/stream --every 15

Only the torch-free runtime runs here: ``edgevlm.runtime.load(bundle)`` and the VLM pipeline's ``generate``, the
same call `edgevlm run` makes, so an image gives the answer `edgevlm run BUNDLE --image IMG --prompt Q` prints,
byte for byte, with the same generation options (greedy by default). Images and frames are decoded by the
runtime's own reader (Pillow with its decompression-bomb guard on; ``edgevlm.data.images.load_image``). OpenCV is
imported only for --camera and --rtsp; the folder mode needs numpy and Pillow alone.

Per frame: the answer, and its latency: ``decode_ms`` (file decode or BGR->RGB conversion), ``vision_encode_ms`` (the
runtime's encode stage: vision graph + prompt embeddings), ``ttft_ms`` (from the decoded image to the first token:
encode + prefill + first pick, the runtime's time to first token) and ``total_ms`` (from the file or raw frame to
the last token). --json prints one JSON object per frame on stdout; the summary goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROG = "edgevlm_jetson"
OPENCV_FIX = ("pip install opencv-python-headless (V4L2 and RTSP), or on a Jetson use JetPack's OpenCV "
              "(apt-get install python3-opencv), which also reads GStreamer pipelines")

# A CSI camera on a Jetson: the Argus camera source, converted to BGR frames for OpenCV's appsink. drop/max-buffers
# keep the newest frame, so a slow model answers about what the camera sees now, not a queue of old frames.
CSI_PIPELINE = ("nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
                "framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR "
                "! appsink drop=true max-buffers=1")

try:
    from edgevlm.errors import BackendUnavailableError, ConfigError, EdgeVLMError
except ImportError:                      # the one import this file needs before it can say anything useful
    print(f"{PROG}: error: edgevlm is not installed — fix: pip install edgevlm (or `pip install .` in a checkout), "
          "then onnxruntime (onnxruntime-gpu on a Jetson) and tokenizers", file=sys.stderr)
    sys.exit(2)


# -- frame sources: each yields (index, name, load) where load() returns the RGB image the runtime reads -------------
def folder_frames(path: Path, every: int) -> list:
    """The images under ``path`` (a folder, searched recursively and sorted, or one image file); each is read and
    decoded when its frame comes, so a file that is not an image fails there, after the frames before it."""
    from edgevlm.data.images import IMAGE_SUFFIXES, list_images, load_image

    if path.is_dir():
        files = list_images(path)
        if not files:
            raise ConfigError(f"{path} holds no images ({' '.join(IMAGE_SUFFIXES)})",
                              "put images in it, or pass another folder to --images")
        names = [str(f.relative_to(path)) for f in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        raise ConfigError(f"no folder or image file at {path}", "pass --images DIR (a folder of .png/.jpg images)")
    return [(i, name, (lambda f=f: load_image(f))) for i, (f, name) in enumerate(zip(files, names)) if i % every == 0]


def bgr_to_rgb(frame):
    """An OpenCV frame (H, W, 3) BGR, (H, W, 4) BGRA or (H, W) gray, uint8 -> an RGB (or gray) array for load_image."""
    import numpy as np

    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[:, :, ::-1]                # BGR -> RGB
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, 2::-1]               # BGRA -> RGB (alpha dropped)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return np.ascontiguousarray(a)


def _opencv():
    try:
        import cv2
    except ImportError:
        raise BackendUnavailableError("OpenCV (cv2) is not installed; --camera and --rtsp read frames through it",
                                      OPENCV_FIX) from None
    return cv2


def _has_gstreamer(cv2) -> bool | None:
    info = getattr(cv2, "getBuildInformation", lambda: "")()
    for line in info.splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.upper()
    return None


def open_capture(spec: str, kind: str, width: int, height: int, fps: int):
    """(cv2.VideoCapture, display name) for --camera SPEC or --rtsp URL."""
    cv2 = _opencv()
    gst = False
    if kind == "rtsp":
        parts = urlsplit(spec)
        if not parts.scheme or not parts.netloc:
            raise ConfigError(f"--rtsp {redact(spec)!r} is not a URL", "pass e.g. --rtsp rtsp://192.168.1.20:8554/cam")
        cap, name = cv2.VideoCapture(spec, cv2.CAP_FFMPEG), redact(spec)
    elif spec.isdigit():
        cap, name = cv2.VideoCapture(int(spec)), f"camera {spec}"
    elif spec.startswith("/dev/video"):
        cap, name = cv2.VideoCapture(spec, cv2.CAP_V4L2), spec
    elif spec == "csi" or spec.startswith("csi:"):
        sensor = spec.partition(":")[2] or "0"
        if not sensor.isdigit():
            raise ConfigError(f"--camera {spec!r}: the CSI sensor id must be a number", "pass --camera csi:0")
        pipeline = CSI_PIPELINE.format(sensor=sensor, width=width, height=height, fps=fps)
        cap, name, gst = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER), f"csi camera {sensor}", True
    elif "!" in spec:
        cap, name, gst = cv2.VideoCapture(spec, cv2.CAP_GSTREAMER), "gstreamer pipeline", True
    else:
        raise ConfigError(f"--camera {spec!r} is neither a device index, /dev/videoN, csi[:N] nor a GStreamer pipeline",
                          "pass --camera 0, --camera /dev/video0, --camera csi or a pipeline ending in appsink")
    if not cap.isOpened():
        if gst and _has_gstreamer(cv2) is False:
            raise BackendUnavailableError("this OpenCV was built without GStreamer, so it cannot open the pipeline "
                                          "(pip's opencv-python wheels have none)",
                                          "use JetPack's OpenCV (apt-get install python3-opencv) and "
                                          "pip uninstall opencv-python opencv-python-headless")
        hint = {"rtsp": "check the URL, the network and the credentials (ffplay URL shows whether it plays)",
                "camera": "check that the device exists (ls /dev/video*), is not in use, and is mapped into the "
                          "container (--device /dev/video0); CSI cameras also need "
                          "-v /tmp/argus_socket:/tmp/argus_socket"}
        raise ConfigError(f"OpenCV could not open {name}", hint[kind])
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)     # V4L2: keep the newest frame (returns False where unsupported)
    return cap, name


def redact(url: str) -> str:
    """A URL without its password, for printing."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<url>"
    if p.password is None:
        return url
    host = p.hostname or ""
    netloc = f"{p.username}:***@{host}" + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def stream_frames(cap, name: str, every: int, stats: dict):
    """Frames of an open capture; skipped frames are grabbed but not decoded. Ends when the stream does."""
    from edgevlm.data.images import load_image

    i = 0
    try:
        while True:
            if i % every:
                if not cap.grab():
                    break
            else:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                yield i, f"{name} #{i}", (lambda frame=frame: load_image(bgr_to_rgb(frame)))
            i += 1
    finally:
        stats["frames_read"] = i
        cap.release()


# -- the loop ----------------------------------------------------------------------------------------------------
def answer(vlm, image, prompt: str, sampling: dict, on_piece=None) -> tuple[str, object]:
    """The answer to ``prompt`` about ``image``: exactly `edgevlm run`'s call (generate with stream=True)."""
    pieces = []
    for piece in vlm.generate(image, prompt, stream=True, **sampling):
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    return "".join(pieces), vlm.last_stats


def run(args) -> int:
    from edgevlm import runtime
    from edgevlm.generation import GenerationConfig, check_prompt

    check_prompt(args.prompt, "--prompt")
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed)
    if args.every < 1:
        raise ConfigError(f"--every {args.every} is not a frame interval", "pass --every 1 (every frame) or more")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames {args.max_frames} answers nothing", "pass --max-frames 1 or more, or omit it")
    stream_stats: dict = {}
    if args.images is not None:
        frames = folder_frames(args.images, args.every)   # a missing or empty folder fails before the bundle loads
        source = str(args.images)
    else:
        _opencv()                        # a missing OpenCV fails here, before the bundle loads
    t = time.perf_counter()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    vlm = runtime.load(args.bundle, decoder=args.decoder_backend, threads=args.threads, providers=providers)
    if getattr(vlm, "manifest", {}).get("task") != "vlm":
        raise ConfigError(f"{args.bundle} is a {vlm.manifest.get('task')} bundle; this sample asks VLM bundles",
                          "export a VLM (edgevlm export, the default model is one) or use `edgevlm run`")
    m = vlm.manifest
    print(f"{PROG}: {m['model']['name']} {m.get('precision', '')} ({m['target'].get('name')}) on {vlm.backend}, "
          f"ONNX Runtime providers {','.join(_providers(vlm)) or '-'}; loaded in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}
    if args.warmup:
        import numpy as np

        side = int(getattr(vlm.image_spec, "size", 224) or 224)
        blank = np.full((side, side, 3), 128, np.uint8)
        for _ in range(args.warmup):     # first runs build TensorRT engines / allocate; keep them out of the figures
            answer(vlm, blank, args.prompt, {**sampling, "max_new_tokens": 2})
    if args.images is None:
        cap, name = open_capture(args.camera if args.camera is not None else args.rtsp,
                                 "camera" if args.camera is not None else "rtsp", args.width, args.height, args.fps)
        frames, source = stream_frames(cap, name, args.every, stream_stats), name
    done: list[dict] = []
    status = 0
    try:
        for i, name, load in frames:
            done.append(one_frame(vlm, i, name, load, args, sampling))
            if args.max_frames is not None and len(done) >= args.max_frames:
                break
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", file=sys.stderr)
        status = 130
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()                      # releases a capture
    if args.images is None and not done and status == 0:
        raise ConfigError(f"no frame came from {source}",
                          "check that the camera or stream delivers video (gst-launch-1.0 / ffplay)")
    summary(done, stream_stats)
    return status


def _providers(vlm) -> list[str]:
    """The execution providers ONNX Runtime chose for the bundle's graphs (the token embedding always runs there)."""
    ort = getattr(getattr(vlm, "embed", None), "ort", None)
    return list(getattr(ort, "providers", None) or [])


def one_frame(vlm, i: int, name: str, load, args, sampling: dict) -> dict:
    t0 = time.perf_counter()
    image = load()                       # ImageError (one line) for a file that is not a decodable image
    t1 = time.perf_counter()
    if args.json:
        text, st = answer(vlm, image, args.prompt, sampling)
    else:
        print(f"[{i}] {name}:", end="", flush=True)
        text, st = answer(vlm, image, args.prompt, sampling, on_piece=lambda p: print(p, end="", flush=True))
        print()
    t2 = time.perf_counter()
    rec = {"frame": i, "source": name, "answer": text, "tokens": st.new_tokens, "prompt_tokens": st.prompt_tokens,
           "image_tokens": st.image_tokens, "decode_ms": round((t1 - t0) * 1000, 3),
           "vision_encode_ms": round(st.encode_s * 1000, 3), "ttft_ms": round(st.time_to_first_token_s * 1000, 3),
           "total_ms": round((t2 - t0) * 1000, 3), "tokens_per_s": round(st.decode_tokens_per_s, 2),
           "stopped_by": st.stopped_by, "backend": vlm.backend}
    if args.json:
        print(json.dumps(rec, ensure_ascii=False), flush=True)
    else:
        print(f"    decode {rec['decode_ms']:.1f} ms | vision encode {rec['vision_encode_ms']:.1f} ms | first token "
              f"{rec['ttft_ms']:.1f} ms | total {rec['total_ms']:.1f} ms | {rec['tokens']} tokens, "
              f"{rec['tokens_per_s']:.1f} tok/s", flush=True)
    return rec


def summary(done: list[dict], stream_stats: dict) -> None:
    if not done:
        return
    tot = [r["total_ms"] for r in done]
    first = [r["ttft_ms"] for r in done]
    enc = [r["vision_encode_ms"] for r in done]
    read = f" of {stream_stats['frames_read']} read" if "frames_read" in stream_stats else ""
    frames = f"{len(done)} frame{'s' if len(done) != 1 else ''}"
    print(f"{PROG}: {frames} answered{read}; median vision encode {statistics.median(enc):.1f} ms, "
          f"first token {statistics.median(first):.1f} ms, total {statistics.median(tot):.1f} ms "
          f"(max {max(tot):.1f} ms)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Answer a prompt about each frame of a camera, an RTSP stream "
                                "or a folder of images with an edgevlm VLM bundle (torch-free runtime), printing "
                                "per-frame latency.")
    p.add_argument("bundle", type=Path, help="a VLM bundle directory (edgevlm export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="DIR", help="a folder of images (recursive, sorted) or one image")
    src.add_argument("--camera", metavar="SPEC", help="a V4L2 index (0), a device (/dev/video0), csi[:SENSOR] "
                     "(nvarguscamerasrc) or a GStreamer pipeline ending in appsink")
    src.add_argument("--rtsp", metavar="URL", help="an RTSP (or other FFmpeg) stream URL")
    p.add_argument("--prompt", default="describe the image.", help="the question asked of every frame "
                   "(default: %(default)r)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="answer every Nth frame (default 1)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after answering N frames (default: all / "
                   "until the stream ends or Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON object per frame on stdout")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--decoder-backend", choices=["onnxruntime", "llama.cpp"],
                   help="bundles carrying both decoders: which runs (default: the bundle's first)")
    p.add_argument("--providers", help="ONNX Runtime execution providers to try, comma-separated (default: the "
                   "bundle's target profile, e.g. "
                   "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every CPU this process may use)")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="runs on a blank image before the first frame, "
                   "so that engine builds and first allocations stay out of the figures (default 0)")
    p.add_argument("--width", type=int, default=1280, help="--camera csi: capture width (default 1280)")
    p.add_argument("--height", type=int, default=720, help="--camera csi: capture height (default 720)")
    p.add_argument("--fps", type=int, default=30, help="--camera csi: capture frame rate (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EdgeVLMError as e:
        sys.stdout.flush()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
