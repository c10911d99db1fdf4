"""The local demo (apps/gradio, `edgevlm demo`): used in headless Chromium as a person would, called through
gradio_client and checked against the runtime, local-only, and refusing bad uploads with a clear message.

The browser test needs Debian's chromium and chromium-driver (no browser downloads); without them it skips,
unless EDGEVLM_REQUIRE_BROWSER=1 (CI's .ci/run sets it), where it fails.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from urllib.parse import urlparse

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from edgevlm._demo import app as demo_app  # noqa: E402  (apps/gradio, as the wheel ships it)

QUESTION = "how many circles are there?"
# gradio's own use of a renamed Starlette constant; nothing the demo can change
pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_bundles(root: Path) -> None:
    """A tiny scenes VLM (random weights, sharpened so greedy decoding varies) and a digits classifier."""
    import torch

    from edgevlm.build import export_bundle
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle
    from edgevlm.config import ExportConfig, QuantConfig
    from edgevlm.modeling.families import load_vlm

    vlm = load_vlm("edgevlm_scenes_tiny", weights="random")
    with torch.no_grad():
        for p in vlm.language_model.parameters():
            p.mul_(4.0)
    export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", precision="fp32",
                                      out=str(root / "scenes_tiny-fp32"), calib_size=4), quiet=True, model=vlm.eval())
    export_bundle(ExportConfig(model="fastvit_t8", quant=QuantConfig(precision="fp32"), out=root / "digits-fp32",
                               validate_accuracy=False), quiet=True)


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory, request):
    """(VLM bundle, classifier bundle), exported once per test run even when xdist splits this module
    (its workers share the parent of their temporary folders)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if hasattr(request.config, "workerinput") else base) / "demo-bundles"
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            _export_bundles(root)
            (root / "done").touch()
    return root / "scenes_tiny-fp32", root / "digits-fp32"


@pytest.fixture(scope="module")
def server(demo_bundles):
    app, url = demo_app.launch(list(demo_bundles), port=_free_port(), block=False, quiet=True, max_upload_mb=1)
    yield app, url
    app.close()


@pytest.fixture(scope="session")
def scene_png(tmp_path_factory) -> Path:
    from edgevlm.data import scenes

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    scenes.render(scenes.make_scene("val", 3)).save(path)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height pixels: what a decompression bomb looks like
    to a decoder that believes it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on ``port`` (Linux /proc/net/tcp{,6})."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:      # 0A = LISTEN
                continue
            raw = bytes.fromhex(addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # per 32-bit word, host order
            found.add(socket.inet_ntop(family, raw))
    return found


@pytest.fixture(scope="session")
def browser():
    """(chromium, chromedriver): Debian's, for Selenium; skip without them (fail under EDGEVLM_REQUIRE_BROWSER=1).
    Requested first, so a skip comes before any bundle is exported."""
    found = {n: shutil.which(n) for n in ("chromium", "chromedriver")}
    missing = [n for n, p in found.items() if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        msg = (f"no {', '.join(missing)} here: apt-get install chromium chromium-driver (Debian), "
               "pip install selenium")
        if os.environ.get("EDGEVLM_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " — EDGEVLM_REQUIRE_BROWSER=1 says this test must run")
        pytest.skip(msg)
    return found["chromium"], found["chromedriver"]


def _chrome(browser):
    """Headless chromium driven through its own chromedriver (no Selenium Manager, no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(browser[1]), options=opts)


def _plain(s: str) -> str:
    return "".join(ch for ch in s if ch.isprintable() and not ch.isspace() and ch != "\ufffd")


def test_browser_upload_ask_and_screenshot(browser, server, demo_bundles, scene_png, sample_image, tmp_path,
                                           monkeypatch):
    """Upload an image, type a question, press Ask: the runtime's answer streams into the chat with its
    cost, and the page renders (a real screenshot, not a blank one)."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from edgevlm import runtime

    _, url = server
    expected = runtime.load(demo_bundles[0]).generate(str(scene_png), QUESTION, max_new_tokens=64).text
    clf = demo_bundles[1].name
    top = runtime.load(demo_bundles[1]).classify(sample_image.parent / "digit_7.png", top_k=5)[0]
    driver = _chrome(browser)
    try:
        wait = WebDriverWait(driver, 120)          # an upper bound for slow machines, not a timing check
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(scene_png))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "ms to first token" in d.find_element(By.ID, "stats").text)
        chat = driver.find_element(By.ID, "chat").text
        assert QUESTION in chat and "tokens/s" in chat and "peak RSS" in chat
        assert _plain(expected) and _plain(expected) in _plain(chat), (expected, chat)
        assert "scenes_tiny-fp32" in driver.find_element(By.ID, "stats").text
        shot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(shot))
        view = driver.execute_script("return [window.innerWidth, window.innerHeight]")

        # switch to the classifier and pick an example image, started from elsewhere than the checkout (gradio
        # serves files from the working directory unasked; the examples must not depend on that)
        monkeypatch.chdir(tmp_path)
        examples = driver.find_elements(By.CSS_SELECTOR, ".gallery-item")
        assert len(examples) >= 10
        [e for e in examples if "digit_7" in (e.get_attribute("innerHTML") or "")][0].click()
        wait.until(lambda d: "digit_7" in (d.find_element(By.CSS_SELECTOR, "#image img").get_attribute("src") or ""))
        driver.find_element(By.CSS_SELECTOR, "#bundle input").click()
        wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == clf])
        [o for o in driver.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == clf][0].click()
        wait.until(lambda d: d.find_element(By.ID, "bars").is_displayed())
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "ms per image" in d.find_element(By.ID, "stats").text)
        assert f"{top.label} {100 * top.score:.1f}%" in driver.find_element(By.ID, "chat").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bars svg, #bars canvas"))
    finally:
        driver.quit()
    img = Image.open(io.BytesIO(shot.read_bytes()))
    img.load()
    assert img.format == "PNG" and img.size == tuple(view)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour"
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100


def test_gradio_client_answers_as_the_runtime_does(server, demo_bundles, scene_png, sample_image):
    from gradio_client import Client, handle_file

    from edgevlm import runtime

    _, url = server
    vlm_path, clf_path = demo_bundles
    client = Client(url, verbose=False)
    assert {"/answer", "/classify", "/compare", "/bundles"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])

    answer, stats = client.predict(handle_file(str(scene_png)), QUESTION, vlm_path.name, "auto", 12, 0.0,
                                   api_name="/answer")
    g = runtime.load(vlm_path).generate(str(scene_png), QUESTION, max_new_tokens=12)
    assert g.text and answer == g.text
    assert stats["new_tokens"] == len(g.token_ids) and stats["image_tokens"] == g.stats.image_tokens
    assert stats["ttft_ms"] > 0 and stats["peak_rss_mib"] > 0 and stats["backend"] == "onnxruntime"
    assert stats["precision"] == "fp32" and stats["size_mb"] > 0

    top, preds, cstats = client.predict(handle_file(str(sample_image)), clf_path.name, "auto", 3, api_name="/classify")
    want = runtime.load(clf_path).classify(sample_image, top_k=3)
    assert top == want[0].label and [p["label"] for p in preds] == [p.label for p in want]
    assert preds[0]["score"] == pytest.approx(want[0].score, abs=1e-5) and cstats["latency_ms"] > 0

    table, _ = client.predict(handle_file(str(scene_png)), QUESTION, [vlm_path.name, clf_path.name], 12, 0.0,
                              api_name="/compare")
    rows = {r[0]: r for r in table["data"]}
    assert rows[vlm_path.name][2] == g.text and rows[vlm_path.name][3] > 0      # answer, time to first token
    assert rows[clf_path.name][2].split()[0] == runtime.load(clf_path).classify(str(scene_png))[0].label

    listed = {b["label"]: b for b in client.predict(api_name="/bundles")}
    assert listed[vlm_path.name]["task"] == "vlm" and listed[clf_path.name]["task"] == "classification"
    facts = listed[vlm_path.name]["facts"]
    assert facts["precision"] == "fp32" and "same greedy tokens as eager" in facts["parity (onnxruntime fp32)"]

    with pytest.raises(Exception, match="image classifier"):       # a clear error, not a stack trace
        client.predict(handle_file(str(scene_png)), QUESTION, clf_path.name, "auto", 12, 0.0, api_name="/answer")


def test_stop_closes_the_stream_and_frees_the_bundle(server, demo_bundles, scene_png):
    """Stop cancels the event, and gradio closes the handler's generator: the bundle must answer again."""
    app, _ = server
    label = demo_bundles[0].name
    stream = app.runner.stream_answer(str(scene_png), "describe the image.", label, None, 48, 0.0)
    text, stats = next(stream)
    assert stats is None
    stream.close()
    _, _, loaded = app.runner.load(label)
    assert not loaded.lock.locked()
    *_, (text, stats) = app.runner.stream_answer(str(scene_png), "describe the image.", label, None, 48, 0.0)
    assert stats is not None and stats["new_tokens"] >= 1


def test_local_only_never_shared_bounded_queue(server, demo_bundles, monkeypatch):
    app, url = server
    port = urlparse(url).port
    assert urlparse(url).hostname == "127.0.0.1"
    if Path("/proc/net/tcp").exists():
        assert _listening_addresses(port) == {"127.0.0.1"}
    assert not app.share and app.share_url is None
    assert app._queue.max_size == 16 and app._queue.default_concurrency_limit == 1
    assert app.max_file_size == 2**20
    # even when the environment asks gradio for every interface
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    other, other_url = demo_app.launch([demo_bundles[1]], port=_free_port(), block=False, quiet=True)
    try:
        assert urlparse(other_url).hostname == "127.0.0.1"
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(urlparse(other_url).port) == {"127.0.0.1"}
    finally:
        other.close()


def test_bad_uploads_are_refused_with_a_clear_message(server, demo_bundles, tmp_path, sample_image):
    import httpx
    from gradio_client import Client, handle_file

    from edgevlm.errors import ImageError

    _, url = server
    client = Client(url, verbose=False)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30_000, 30_000))
    for path, needle in ((text, "notes.png is not an image this demo accepts"),
                         (bomb, "bomb.png is a decompression bomb")):
        with pytest.raises(Exception, match=needle):
            client.predict(handle_file(str(path)), demo_bundles[1].name, "auto", 3, api_name="/classify")
        with pytest.raises(Exception, match=needle):
            client.predict(handle_file(str(path)), QUESTION, demo_bundles[0].name, "auto", 4, 0.0, api_name="/answer")
    # too large (the server was started with a 1 MiB limit): gradio's upload route refuses it unstored
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(2**20 + 100)
    r = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    # and the app's own check, for files that reach it by any other route
    with pytest.raises(ImageError, match="over this demo's upload limit of"):
        demo_app.vet_image_file(sample_image, "digit.png", max_bytes=100)
    demo_app.vet_image_file(sample_image, "digit.png", max_bytes=2**20)       # a real image passes


def test_grounding_answers_are_drawn(scene_png):
    from PIL import Image

    assert demo_app.draw_grounding(str(scene_png), "two circles") is None
    img = demo_app.draw_grounding(str(scene_png), "<box>0.25,0.25,0.75,0.75</box> <point>0.10,0.90</point>")
    src = Image.open(scene_png).convert("RGB")
    assert img.width >= 384 and img.width % src.width == 0
    scale = img.width // src.width
    plain = src.resize(img.size, Image.NEAREST)
    assert img.getpixel((img.width // 4, img.height // 2)) != plain.getpixel((img.width // 4, img.height // 2))   # box edge
    assert img.getpixel((int(0.1 * img.width), int(0.9 * img.height))) != plain.getpixel(
        (int(0.1 * img.width), int(0.9 * img.height)))                                                         # point
    assert img.getpixel((img.width // 2, img.height // 2)) == plain.getpixel((img.width // 2, img.height // 2))  # inside
    assert scale > 1


def test_default_bundle_is_exported_once_into_the_cache(monkeypatch, tmp_path, demo_bundles):
    import edgevlm.build
    import edgevlm.build_vlm
    from edgevlm.zoo import DEFAULT_MODEL

    calls = []

    def fake_export(cfg, quiet=False, **kw):
        calls.append(cfg)
        shutil.copytree(demo_bundles[1], Path(cfg.out))
        return Path(cfg.out), {}

    monkeypatch.setattr(edgevlm.build, "export_bundle", fake_export)
    monkeypatch.setattr(edgevlm.build_vlm, "export_vlm_bundle", fake_export)
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    first = demo_app.default_bundle(quiet=True)
    assert first == tmp_path / "cache" / "bundles" / f"{DEFAULT_MODEL}-cpu-int8"
    assert demo_app.default_bundle(quiet=True) == first and len(calls) == 1
    cfg = calls[0]
    assert (cfg.quant.precision if hasattr(cfg, "quant") else cfg.precision).value == "int8" and cfg.target == "cpu"
    monkeypatch.delenv("EDGEVLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_app.cache_dir() == tmp_path / "xdg" / "edgevlm"


def test_the_demo_runs_bundles_without_torch(demo_bundles, scene_png):
    """What the demo shows is what the device runs: app, runtime and answers, with torch unimportable."""
    code = f"""
import sys
sys.modules["torch"] = None
from edgevlm._demo import app
demo = app.build_app([{str(demo_bundles[0])!r}, {str(demo_bundles[1])!r}], examples=[])
*_, (text, stats) = demo.runner.stream_answer({str(scene_png)!r}, "describe the image.", {demo_bundles[0].name!r})
preds, _ = demo.runner.classify({str(scene_png)!r}, {demo_bundles[1].name!r})
print(stats["new_tokens"], preds[0].label)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[0]) >= 1


def _edgevlm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, text=True, **kw)


def test_cli_demo_help_bad_bundle_and_serving(tmp_path, demo_bundles):
    r = _edgevlm("demo", "--help")
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "--max-upload-mb" in r.stdout
    (tmp_path / "empty").mkdir()
    for bad, needle in ((tmp_path / "nope", "no bundle at"), (tmp_path / "empty", "has no manifest.json")):
        r = _edgevlm("demo", demo_bundles[1], bad, "--port", _free_port())
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("edgevlm: error:")

    # the real thing: `edgevlm demo BUNDLE` serves the app on 127.0.0.1 until interrupted
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", "demo", str(demo_bundles[1]), "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "edgevlm demo:" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(180)         # an upper bound for slow machines, not a timing check
        assert any(f"http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "edgevlm demo" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
