"""apps/jetson: the camera / RTSP / folder sample and its Dockerfile.

The folder mode runs here on CPU against the default model's bundle and must answer exactly as `edgevlm run`
does; camera and RTSP modes run against a stand-in `cv2` module that replays the same images as BGR frames, so a
wrong colour conversion changes the answers. The Dockerfile is parsed, never built (no Jetson, GPU or Docker here).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "jetson"
APP = APP_DIR / "edgevlm_jetson.py"
SAMPLES = ROOT / "models" / "samples"
IMAGES = ["scene_0.png", "scene_1.png", "scene_2.png"]
PROMPT = "describe the image."
MAX_NEW = "24"
HEAVY = ("torch", "torchvision", "transformers", "timm", "cv2")

try:
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)          # only the stand-in cv2 tests put something there
    env.update(extra)
    return env


def run_app(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), *map(str, args)], check=False, capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


def run_wrapped(code_before: str, *args, env=None) -> subprocess.CompletedProcess:
    """The sample run in-process by a `-c` wrapper: ``code_before`` first, then the sample as __main__; prints the heavy
    modules loaded by the end as a last line "HEAVY [...]" on stderr."""
    wrapper = textwrap.dedent(f"""
        import json, runpy, sys
        {code_before}
        sys.argv = {[str(APP), *map(str, args)]!r}
        code = 0
        try:
            runpy.run_path({str(APP)!r}, run_name="__main__")
        except SystemExit as e:
            code = e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} and sys.modules[m] is not None)
        print("HEAVY " + json.dumps(heavy), file=sys.stderr)
        sys.exit(code)
    """)
    return subprocess.run([sys.executable, "-c", wrapper], check=False, capture_output=True, text=True,
                          env=env or _env(), timeout=300, cwd=ROOT)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode not in (0, None), (r.stdout, r.stderr)
    # the line saying which bundle loaded (printed before a frame fails) is not part of the error
    err = [line for line in r.stderr.splitlines() if line.strip() and " loaded in " not in line]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err) == 1, r.stderr
    assert err[0].startswith("edgevlm_jetson: error: ") and " — fix: " in err[0], err[0]
    for w in words:
        assert w in err[0], err[0]


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The default model's bundle (shipped weights), fp32, once for this module: ONNX decoder (about 40 s on 2 CPUs),
    and the llama.cpp decoder beside it where llama-cpp-python is here (about 110 s for both), as Jetsons run it."""
    import edgevlm

    out = tmp_path_factory.mktemp("jetson") / "scenes-fp32"
    path, manifest = edgevlm.export(precision="fp32", out=out, quiet=True, parity_tokens=4,
                                    decoder="both" if HAVE_LLAMA else "onnx")
    assert manifest["task"] == "vlm"
    return Path(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("frames")
    for name in IMAGES:
        shutil.copy(SAMPLES / name, d / name)
    return d


@pytest.fixture(scope="module")
def cli_answers(bundle) -> dict[str, str]:
    """`edgevlm run`'s answer for each image: its stdout less the one newline it ends with."""
    answers = {}
    for name in IMAGES:
        r = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(bundle), "--image", str(SAMPLES / name),
                            "--prompt", PROMPT, "--max-new-tokens", MAX_NEW], check=False, capture_output=True,
                           text=True, env=_env(), timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n")
        answers[name] = r.stdout[:-1]
    assert len(set(answers.values())) == len(IMAGES), f"the scenes should get different answers: {answers}"
    return answers


@pytest.fixture(scope="module")
def folder_run(bundle, folder) -> subprocess.CompletedProcess:
    return run_app(bundle, "--images", folder, "--prompt", PROMPT, "--max-new-tokens", MAX_NEW, "--json")


@pytest.fixture
def fake_cv2(tmp_path) -> Path:
    """A folder holding a stand-in `cv2`: VideoCapture replays FAKE_CV2_FRAMES (image paths, os.pathsep-separated)
    as BGR frames and records how it was opened in FAKE_CV2_LOG."""
    d = tmp_path / "fakecv2"
    d.mkdir()
    (d / "cv2.py").write_text(textwrap.dedent('''
        import json, os
        import numpy as np
        from PIL import Image

        CAP_ANY, CAP_V4L2, CAP_FFMPEG, CAP_GSTREAMER, CAP_PROP_BUFFERSIZE = 0, 200, 1900, 1800, 38

        def getBuildInformation():
            return "  Video I/O:\\n    GStreamer:                   " + os.environ.get("FAKE_CV2_GST", "YES (1.20.3)")

        class VideoCapture:
            def __init__(self, source, api=CAP_ANY):
                with open(os.environ["FAKE_CV2_LOG"], "a") as f:
                    f.write(json.dumps({"source": source, "api": api}) + "\\n")
                paths = [p for p in os.environ.get("FAKE_CV2_FRAMES", "").split(os.pathsep) if p]
                self.frames = [np.asarray(Image.open(p).convert("RGB"))[:, :, ::-1].copy() for p in paths]
                self.opened = os.environ.get("FAKE_CV2_OPEN", "1") == "1"
                self.released = False

            def isOpened(self):
                return self.opened

            def set(self, prop, value):
                return True

            def grab(self):
                if not self.frames:
                    return False
                self.frames.pop(0)
                return True

            def read(self):
                if not self.frames:
                    return False, None
                return True, self.frames.pop(0)

            def release(self):
                self.released = True
                with open(os.environ["FAKE_CV2_LOG"], "a") as f:
                    f.write(json.dumps({"released": True}) + "\\n")
    '''))
    return d


def fake_env(fake: Path, frames: list[str], log: Path, **extra) -> dict:
    return _env(PYTHONPATH=str(fake), FAKE_CV2_LOG=str(log),
                FAKE_CV2_FRAMES=os.pathsep.join(str(SAMPLES / f) for f in frames), **extra)


# -- folder mode: the same answers as `edgevlm run` --------------------------------------------------------------
def test_folder_answers_equal_edgevlm_run(folder_run, cli_answers):
    assert folder_run.returncode == 0, folder_run.stderr
    recs = json_lines(folder_run.stdout)
    assert [r["source"] for r in recs] == IMAGES
    assert [r["frame"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert r["answer"] == cli_answers[r["source"]], r["source"]


def test_latency_fields_present_and_positive(folder_run):
    recs = json_lines(folder_run.stdout)
    assert len(recs) == len(IMAGES)
    for r in recs:
        for k in ("vision_encode_ms", "ttft_ms", "total_ms"):
            assert isinstance(r[k], float) and r[k] > 0, (k, r)
        assert r["decode_ms"] >= 0
        # time to first token includes the encode stage; the total includes decoding the file and every token
        assert r["vision_encode_ms"] <= r["ttft_ms"] <= r["total_ms"], r
        assert r["tokens"] >= 1 and r["image_tokens"] > 0 and r["backend"] == "onnxruntime"
        assert r["stopped_by"] in ("stop token", "max_new_tokens", "context")
    assert "3 frames answered" in folder_run.stderr


def test_text_mode_prints_answers_and_latency(bundle, folder, cli_answers):
    r = run_app(bundle, "--images", folder, "--prompt", PROMPT, "--max-new-tokens", MAX_NEW)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for i, name in enumerate(IMAGES):
        assert f"[{i}] {name}:{cli_answers[name]}" in lines
    latency = [line for line in lines if "first token" in line]
    assert len(latency) == len(IMAGES)
    assert all(re.search(r"vision encode \d+\.\d ms \| first token \d+\.\d ms \| total \d+\.\d ms", x) for x in latency)


def test_every_and_max_frames(bundle, folder, cli_answers):
    r = run_app(bundle, "--images", folder, "--every", "2", "--json", "--max-new-tokens", MAX_NEW)
    assert r.returncode == 0, r.stderr
    assert [x["source"] for x in json_lines(r.stdout)] == ["scene_0.png", "scene_2.png"]
    r = run_app(bundle, "--images", folder, "--max-frames", "1", "--json", "--max-new-tokens", MAX_NEW)
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert len(recs) == 1 and recs[0]["answer"] == cli_answers["scene_0.png"]


def test_one_image_file_and_sampling_options(bundle):
    """A single file works as a folder of one; a seeded sampled answer is still `edgevlm run`'s."""
    opts = ["--prompt", "what color is the cross?", "--max-new-tokens", "8", "--temperature", "0.9", "--seed", "3"]
    r = run_app(bundle, "--images", SAMPLES / "scene_1.png", "--json", *opts)
    assert r.returncode == 0, r.stderr
    cli = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(bundle), "--image",
                          str(SAMPLES / "scene_1.png"), *opts], check=False, capture_output=True, text=True,
                         env=_env(), timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert json_lines(r.stdout)[0]["answer"] == cli.stdout[:-1]


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python (and gguf) not installed: the bundle has no GGUF decoder")
def test_llama_cpp_decoder_answers_equal_edgevlm_run(bundle, folder):
    r = run_app(bundle, "--images", folder, "--json", "--max-new-tokens", MAX_NEW, "--prompt", PROMPT,
                "--decoder-backend", "llama.cpp")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert [x["backend"] for x in recs] == ["llama.cpp"] * len(IMAGES)
    for x in recs:
        cli = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(bundle), "--image", str(folder / x["source"]),
                              "--prompt", PROMPT, "--max-new-tokens", MAX_NEW, "--decoder-backend", "llama.cpp"],
                             check=False, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        assert x["answer"] == cli.stdout[:-1], x["source"]
        assert x["ttft_ms"] > 0 and x["total_ms"] >= x["ttft_ms"]


def test_sample_imports_no_torch_and_no_opencv_in_folder_mode(bundle, folder):
    r = run_wrapped("", bundle, "--images", folder, "--max-frames", "1", "--json", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert len(json_lines(r.stdout)) == 1
    heavy = json.loads(r.stderr.strip().splitlines()[-1].removeprefix("HEAVY "))
    assert heavy == [], f"the sample loaded {heavy}"


# -- bad input: one line naming the problem and the fix, no traceback ----------------------------------------------
def test_missing_folder(bundle, tmp_path):
    assert_one_line_error(run_app(bundle, "--images", tmp_path / "nope"), "no folder or image file at")


def test_empty_folder(bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert_one_line_error(run_app(bundle, "--images", tmp_path / "empty"), "holds no images")


@pytest.mark.parametrize("name, data", [("broken.png", b"this is text, not a PNG"),
                                        ("notes.txt", b"plain text")])
def test_non_image_file(bundle, tmp_path, name, data):
    bad = tmp_path / name
    bad.write_bytes(data)
    if name.endswith(".png"):        # in a folder: the listed file fails to decode
        r = run_app(bundle, "--images", tmp_path)
    else:                            # passed directly
        r = run_app(bundle, "--images", bad)
    assert_one_line_error(r, "not a decodable image")
    assert r.stdout == ""


def test_decompression_bomb_is_refused(bundle, tmp_path):
    """Frames are read by the runtime's reader, with Pillow's decompression-bomb guard on: a 72 MP PNG of a few kB
    is refused."""
    from PIL import Image

    Image.new("1", (9000, 8000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 1 << 20
    r = run_app(bundle, "--images", tmp_path)
    assert_one_line_error(r, "bomb.png", "decompression bomb")


def test_missing_bundle_and_bad_options(tmp_path, folder, bundle):
    assert_one_line_error(run_app(tmp_path / "no-bundle", "--images", folder), "no bundle")
    assert_one_line_error(run_app(bundle, "--images", folder, "--every", "0"), "--every")
    assert_one_line_error(run_app(bundle, "--images", folder, "--max-frames", "0"), "--max-frames")
    assert_one_line_error(run_app(bundle, "--images", folder, "--temperature", "nan"))


def test_camera_without_opencv_names_the_install(bundle):
    """cv2 hidden (sys.modules['cv2'] = None makes `import cv2` fail), whether or not OpenCV is installed here."""
    for src in (["--camera", "0"], ["--rtsp", "rtsp://127.0.0.1:8554/x"]):
        r = run_wrapped("sys.modules['cv2'] = None", bundle, *src)
        r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout,
                                        "\n".join(x for x in r.stderr.splitlines() if not x.startswith("HEAVY ")))
        assert_one_line_error(r, "OpenCV", "pip install opencv-python-headless")


# -- camera and RTSP modes against a stand-in cv2 ------------------------------------------------------------------
def test_csi_camera_frames_answer_like_edgevlm_run(bundle, fake_cv2, tmp_path, cli_answers):
    """BGR frames converted right give the answers of the same images as files; the CSI pipeline goes to GStreamer."""
    log = tmp_path / "log.jsonl"
    frames = ["scene_2.png", "scene_1.png", "scene_0.png", "scene_1.png", "scene_2.png"]
    r = run_app(bundle, "--camera", "csi:1", "--every", "2", "--max-frames", "2", "--json", "--prompt", PROMPT,
                "--max-new-tokens", MAX_NEW, env=fake_env(fake_cv2, frames, log))
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert [x["frame"] for x in recs] == [0, 2]
    assert [x["answer"] for x in recs] == [cli_answers["scene_2.png"], cli_answers["scene_0.png"]]
    assert all(x["decode_ms"] >= 0 and x["total_ms"] > 0 for x in recs)
    opened, *rest = [json.loads(x) for x in log.read_text().splitlines()]
    assert "nvarguscamerasrc sensor-id=1" in opened["source"] and "appsink" in opened["source"]
    assert opened["api"] == 1800                               # cv2.CAP_GSTREAMER of the stand-in
    assert {"released": True} in rest


def test_v4l2_camera_and_stream_end(bundle, fake_cv2, tmp_path, cli_answers):
    log = tmp_path / "log.jsonl"
    r = run_app(bundle, "--camera", "0", "--json", "--prompt", PROMPT, "--max-new-tokens", MAX_NEW,
                env=fake_env(fake_cv2, ["scene_1.png"], log))
    assert r.returncode == 0, r.stderr                          # the stream ended after one frame
    assert [x["answer"] for x in json_lines(r.stdout)] == [cli_answers["scene_1.png"]]
    assert json.loads(log.read_text().splitlines()[0]) == {"source": 0, "api": 0}
    assert "1 frame answered of 1 read" in r.stderr


def test_rtsp_url_password_is_never_printed(bundle, fake_cv2, tmp_path, cli_answers):
    log = tmp_path / "log.jsonl"
    url = "rtsp://viewer:s3cret-pw@10.0.0.7:8554/cam"
    r = run_app(bundle, "--rtsp", url, "--max-frames", "1", "--prompt", PROMPT, "--max-new-tokens", MAX_NEW,
                env=fake_env(fake_cv2, ["scene_0.png", "scene_1.png"], log))
    assert r.returncode == 0, r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr
    assert f"[0] rtsp://viewer:***@10.0.0.7:8554/cam #0:{cli_answers['scene_0.png']}" in r.stdout.splitlines()
    assert json.loads(log.read_text().splitlines()[0]) == {"source": url, "api": 1900}   # CAP_FFMPEG


def test_stream_errors_are_one_line(bundle, fake_cv2, tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_app(bundle, "--camera", "0", env=fake_env(fake_cv2, ["scene_0.png"], log, FAKE_CV2_OPEN="0"))
    assert_one_line_error(r, "could not open camera 0", "/dev/video")
    r = run_app(bundle, "--camera", "csi", env=fake_env(fake_cv2, [], log, FAKE_CV2_OPEN="0", FAKE_CV2_GST="NO"))
    assert_one_line_error(r, "without GStreamer", "python3-opencv")
    r = run_app(bundle, "--rtsp", "rtsp://u:pw@h/x", env=fake_env(fake_cv2, [], log))
    assert_one_line_error(r, "no frame came from rtsp://u:***@h/x")
    assert "pw@" not in r.stderr
    assert_one_line_error(run_app(bundle, "--camera", "/dev/video2", env=fake_env(fake_cv2, [], log)),
                          "no frame came from /dev/video2")
    r = run_app(bundle, "--camera", "webcam", env=fake_env(fake_cv2, [], log))
    assert_one_line_error(r, "--camera 'webcam'")


def test_bgr_to_rgb():
    spec = importlib.util.spec_from_file_location("edgevlm_jetson_under_test", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 10                                            # blue
    bgr[..., 2] = 200                                           # red
    rgb = mod.bgr_to_rgb(bgr)
    assert rgb.flags["C_CONTIGUOUS"] and (rgb[..., 0] == 200).all() and (rgb[..., 2] == 10).all()
    bgra = np.concatenate([bgr, np.full((2, 3, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(mod.bgr_to_rgb(bgra), rgb)
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(mod.bgr_to_rgb(gray), gray)
    assert np.array_equal(mod.bgr_to_rgb(gray[..., None]), gray)
    assert mod.redact("rtsp://a:b@h:1/p") == "rtsp://a:***@h:1/p" and mod.redact("rtsp://h/p") == "rtsp://h/p"


# -- the Dockerfile and README (parsed; never built here) --------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += (" " if buf else "") + (s[:-1].rstrip() if s.endswith("\\") else s)
        if not s.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_base_healthcheck_entrypoint_and_installs():
    ins = dockerfile_instructions(APP_DIR / "Dockerfile")
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip())
    base = [rest for word, rest in ins if word == "FROM"]
    assert len(base) == 1
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], base[0].split()[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", image), image   # JetPack 6's L4T

    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1
    cmd = health[0].split("CMD", 1)[1].strip()
    argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv[:2] == ["edgevlm", "verify"] and argv[2] == "/bundle", argv

    entry = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0][-1] == "/bundle"
    script = next(a for a in entry[0] if a.endswith(".py"))
    assert script == "/opt/edgevlm/apps/jetson/" + APP.name    # where the RUN step copies apps/jetson

    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert re.search(r"--index-url \$\{JETSON_PIP_INDEX\}.*onnxruntime-gpu", runs)
    assert args.get("JETSON_PIP_INDEX", "").startswith("https://pypi.jetson-ai-lab.io/jp6/")
    assert re.search(r'CMAKE_ARGS="[^"]*-DGGML_CUDA=on[^"]*"[^&]*pip install "llama-cpp-python', runs)
    assert "cp -r /opt/edgevlm/src/apps/jetson /opt/edgevlm/apps/jetson" in runs
    assert "cuda-python" in runs and "python3-libnvinfer" in runs    # native engines (edgevlm/runtime/tensorrt.py)
    # the CPU onnxruntime (edgevlm's `runtime` extra) would shadow onnxruntime-gpu's module
    assert ".[runtime]" not in runs and not re.search(r"pip install[^&]*\bonnxruntime(?![-\w])", runs)
    assert '/opt/edgevlm/src[jetson]"' in runs
    import tomllib

    extras = tomllib.loads((APP_DIR.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    jetson = " ".join(extras["jetson"])
    assert "tokenizers" in jetson and "onnx" in jetson and not re.search(r"\bonnxruntime\b", jetson)
    assert "torch" not in runs.replace("'torch' not in sys.modules", "")


def test_dockerignore_keeps_the_package_and_drops_local_state():
    ignored = {line.strip() for line in (APP_DIR / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "bundles"} <= ignored
    # what `pip install` of the package reads (pyproject.toml's package-dir and readme) must stay in the context
    assert not ignored & {"edgevlm", "models", "export", "apps", "README.md", "pyproject.toml"}


def test_readme_states_limits_and_documents_real_flags():
    text = (APP_DIR / "README.md").read_text()
    flat = " ".join(text.replace("**", "").split()).lower()
    assert "not built or run in ci: no jetson, gpu or docker there; the folder mode runs in the tests on cpu" in flat
    spec = importlib.util.spec_from_file_location("edgevlm_jetson_flags", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    known = {o for a in mod.build_parser()._actions for o in a.option_strings}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))
    docker = {"--runtime", "--device", "--network", "--rm", "--entrypoint", "--no-healthcheck", "--target", "--out",
              "--image", "--index-url"}
    assert used - docker <= known, sorted(used - docker - known)
    assert "--device /dev/video0" in text and "--runtime nvidia" in text
