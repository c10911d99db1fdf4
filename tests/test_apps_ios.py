"""apps/ios: the Swift package EdgeVLM and the SwiftUI sample app.

Nothing here can compile Swift (no macOS, no swiftc), so this checks what Linux can, and what breaks when the ios
bundle contract or the Python reference moves under the Swift code:

- every manifest / golden.json key the Swift code reads (the j*(dict, "key") calls and ["key"] subscripts pulled out
  of the .swift files) is in the ios VLM bundle contract written out below (the spec the exporter is being written
  to) or is a generation key the Python runtime reads too;
- every part name and Core ML input / output / state name the Swift code feeds or reads is the contract's, and the
  vision parts' names are the Python runtime's (vlm.PART_INPUTS) and the family modules' PartSpec outputs;
- Golden.swift's constants equal runtime/golden.py's; the sampling, mask, image-limit and crop constants equal
  generation.py's, vlm_ops.py's, data/images.py's and data/crops.py's;
- Package.swift pins swift-transformers (Tokenizers, Hub) to one exact release; the README says plainly that nothing
  was compiled, lists the APIs it checked, and its Python <-> Swift table names things that exist on both sides;
- where swiftc is installed (never here), the Foundation-only files type-check;
- the default model's ios FP16 bundle carries every key, part, file and Core ML I/O / state name (and element type)
  the Swift code reads (test_real_ios_bundle_has_what_the_swift_code_reads: it needs the ios VLM exporter, and fails
  on a tree where `edgevlm export --target ios` still refuses VLMs);
- the decoder protocol CoreMLDecoder.swift uses (fresh state, prefill in max_prefill chunks, float32 mask, int32
  positions, steps embedded from the raw float16 table) gives the Python runtime's greedy tokens on that bundle,
  run in numpy on edgevlm's reference ML-program interpreter (not Core ML).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from vlm_utils import edgevlm_name

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "ios"
LIB = APP / "Sources" / "EdgeVLM"
SWIFT = sorted(APP.rglob("*.swift"))
PURE = ["Errors.swift", "Generation.swift", "Golden.swift", "Preprocess.swift", "Crops.swift"]     # Foundation only
README = APP / "README.md"

# -- the ios VLM bundle contract (the spec the exporter is written to; see the README) -------------------------------
MANIFEST_KEYS = {"kind", "task", "target", "precision", "generation", "parts", "files", "golden", "parity",
                 "device_files", "edgevlm_version"}
TARGET_KEYS = {"format", "name"}
PART_RECORD = {"path", "format", "precision", "details"}
EMBED_DETAILS = {"dtype", "shape", "byte_order"}
DECODER_DETAILS = {"context_length", "max_prefill", "states"}
FILE_RECORD = {"sha256", "size"}
GOLDEN_BLOCK = {"path"}
PARTS = {"vision_encoder", "vision_tower", "vision_projector", "region", "prefusion", "embed_tokens", "decoder_coreml"}
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids"]
DECODER_OUTPUTS = {"logits", "hidden"}
DECODER_STATES = {"key_cache", "value_cache"}
GOLDEN_KEYS = {"kind", "cases", "id", "image", "prompt", "eager", "tokens", "top5", "ids", "logits", "logsumexp",
               "criteria"}
TOKENIZER_JSON_KEYS = {"model", "type"}          # tokenizer.json: the model type picks swift-transformers' class
OVERLAP_OPTIONS = {"patch_size", "overlap_margin", "max_crops", "resample"}
# What a template-prompt VLM bundle (the default model) must carry for the Swift code, as manifest paths.
REQUIRED = [("task",), ("target", "format"), ("generation", "image", "size"), ("generation", "image", "mode"),
            ("generation", "image", "interpolation"), ("generation", "image", "mean"), ("generation", "image", "std"),
            ("generation", "prompt", "kind"), ("generation", "prompt", "template"), ("generation", "prompt", "bos"),
            ("generation", "prompt", "bos_id"), ("generation", "stop_ids"), ("generation", "context_length"),
            ("generation", "hidden_size"), ("generation", "bidirectional_image_prefix"),
            ("parts", "vision_encoder", "path"), ("parts", "embed_tokens", "path"),
            ("parts", "embed_tokens", "details", "dtype"), ("parts", "embed_tokens", "details", "shape"),
            ("parts", "embed_tokens", "details", "byte_order"), ("parts", "decoder_coreml", "path"),
            ("parts", "decoder_coreml", "details", "context_length"),
            ("parts", "decoder_coreml", "details", "max_prefill"), ("parts", "decoder_coreml", "details", "states"),
            ("golden", "path"), ("files",)]

J_CALL = re.compile(r'\bj(?:obj|str|int|double|bool|ints|doubles|arr|has)\(\s*[^,()"]+?,\s*"([^"\\]+)"')
SUBSCRIPT = re.compile(r'\[\s*"([A-Za-z_0-9]+)"\s*\]')


def swift(name: str | None = None) -> str:
    files = [LIB / name] if name else SWIFT
    return "\n".join(f.read_text() for f in files)


def library() -> str:
    """The package's sources (the app and Package.swift read no manifest)."""
    files = sorted(LIB.glob("*.swift"))
    return "\n".join(f.read_text() for f in files)


def keys_read(text: str) -> set[str]:
    return set(J_CALL.findall(text)) | set(SUBSCRIPT.findall(text))


def python_runtime_text() -> str:
    files = [*(ROOT / "edgevlm" / "runtime").glob("*.py"), ROOT / "edgevlm" / "bundle.py",
             ROOT / "edgevlm" / "processor.py", ROOT / "edgevlm" / "data" / "crops.py"]
    return "\n".join(p.read_text() for p in files)


def dig(obj, path):
    for k in path:
        obj = obj[k]
    return obj


# -- manifest, golden and part names --------------------------------------------------------------------------------
def test_every_key_the_swift_code_reads_is_in_the_ios_contract():
    used = keys_read(library())
    assert {"context_length", "max_prefill", "states", "dtype", "byte_order", "stop_ids", "sha256", "size"} <= used
    contract = (MANIFEST_KEYS | TARGET_KEYS | PART_RECORD | EMBED_DETAILS | DECODER_DETAILS | FILE_RECORD | GOLDEN_BLOCK
                | PARTS | GOLDEN_KEYS | TOKENIZER_JSON_KEYS | OVERLAP_OPTIONS)
    py = python_runtime_text()
    # the rest are generation keys (image spec, prompt, vision, ...): the Python runtime must read each of them too
    for key in sorted(used - contract):
        assert f'"{key}"' in py, f"the Swift code reads {key!r}, which neither the ios contract nor the Python runtime has"
    assert GOLDEN_KEYS <= used, "golden.json keys the Swift code no longer reads"
    for path in REQUIRED:
        assert path[-1] in used, f"the Swift code does not read {'.'.join(path)}"


def test_part_and_core_ml_names_follow_the_contract_and_the_python_runtime():
    from edgevlm.runtime import vlm

    text = swift()
    parts = set(re.findall(r'\b(?:part|loadPart)\((?:b,\s*|bundle,\s*)?"(\w+)"', text))
    parts |= set(re.findall(r'PART_OUTPUTS\["(\w+)"\]', text))
    assert {"vision_encoder", "vision_tower", "vision_projector", "embed_tokens", "decoder_coreml"} <= parts
    assert parts <= PARTS
    # the vision parts' inputs are the ONNX parts' (vlm.PART_INPUTS), their outputs the family modules' PartSpecs
    decl = re.search(r"PART_INPUTS: \[String: \[String\]\] = (\[.*?\])\n", text, re.S).group(1)
    swift_inputs = dict(re.findall(r'"(\w+)": \["(\w+)"\]', decl))
    for name, first in swift_inputs.items():
        assert vlm.PART_INPUTS[name] == (first,), name
    outs = dict(re.findall(r'"(\w+)": "(\w+)"', re.search(r"PART_OUTPUTS: \[String: String\] = (\[.*?\])\n", text, re.S).group(1)))
    modeling = (ROOT / "edgevlm" / "modeling" / "vlm.py").read_text() + (ROOT / "edgevlm" / "modeling" / "moondream2.py").read_text()
    for part, out in outs.items():
        assert re.search(rf'PartSpec\("{part}".*?\("{out}",?\)', modeling, re.S), (part, out)
    # the stateful decoder's inputs, output and states
    assert re.search(r'DECODER_INPUTS = \["inputs_embeds", "attention_mask", "position_ids"\]', text)
    assert list(vlm.DECODER_INPUTS) == DECODER_INPUTS
    fed = set(re.findall(r'"(\w+)": try multiArray\(', text))
    assert fed == {"inputs_embeds", "attention_mask", "position_ids", "pixel_values", "merged_features"}
    assert set(re.findall(r'output: "(\w+)"', text)) <= DECODER_OUTPUTS
    assert 'outputDescriptionsByName["logits"]' in text and "stateDescriptionsByName" in text
    assert "makeState()" in text and "prediction(from: provider, using:" in text
    # position_ids are int32, the mask and embeddings float32, as the contract says
    assert re.search(r'"position_ids": try multiArray\(\(nPast\.\.<total\)\.map \{ Int32\(\$0\) \}', text)
    assert "dataType: .int32" in text and "dataType: .float32" in text


def test_the_swift_prompt_and_mask_follow_the_python_steps():
    """The steps that carry numbers, compared as text with their Python originals."""
    text = swift("VLMPipeline.swift")
    gen = swift("Generation.swift")
    # attention_mask: causal, bidirectional prefix > 1 only, MASK_MIN for masked, prefix only when the state is empty
    assert "allowed = k <= q" in gen and "bidirectionalPrefix > 1 && q < bidirectionalPrefix && k < bidirectionalPrefix" in gen
    assert "attentionMask(s, nPast, nPast == 0 ? prefix : 0)" in text
    # prepare: bidirectional prefix = tokens before the image + image tokens, as VLMPipeline.prepare
    assert 'jbool(bundle.generation, "bidirectional_image_prefix", false) ? pieces.before.count + img.tokens : 0' in text
    # tokenizer: no special tokens added, special tokens skipped on decode, no space clean-up (the tokenizers package)
    assert "addSpecialTokens: false" in text and "skipSpecialTokens: true" in text
    assert '"clean_up_tokenization_spaces": false' in text
    # decode_tokens: a fresh state per conversation; the stream resets it at the end
    assert text.count("decoder.reset()") >= 4
    # the golden trace: greedy without early stop, then teacher-forced on eager's tokens minus the last
    assert "GenerationConfig(maxNewTokens: refIds.count)" in text and "refIds.dropLast()" in text


# -- constants ---------------------------------------------------------------------------------------------------------
def swift_consts(text: str) -> dict:
    out = {}
    for name, value in re.findall(r'^public let (\w+)(?:: [\w\[\]]+)? = (.+)$', text, re.MULTILINE):
        value = value.split("//")[0].strip()
        if value.startswith('"'):
            out[name] = value.strip('"')
        elif value.startswith("["):
            out[name] = re.findall(r'"([^"]+)"', value) or [float(v) for v in re.findall(r"-?[\d.]+(?:e-?\d+)?", value)]
        elif re.fullmatch(r"-?[\d._]+(e-?\d+)?", value):
            value = value.replace("_", "")
            out[name] = float(value) if any(c in value for c in ".e") else int(value)
        elif re.fullmatch(r"\d+ \* \d+ \* \d+", value):
            a, b, c = map(int, value.split(" * "))
            out[name] = a * b * c
    return out


def test_golden_constants_equal_the_python_reference():
    from edgevlm.runtime import golden

    got = swift_consts(swift("Golden.swift"))
    for name in ("GOLDEN_DIR", "GOLDEN_JSON", "VERSION", "TOP_K", "NEW_TOKENS", "TOP1_MARGIN", "PREFIX_FRACTION",
                 "TIE_GAP", "KL_FACTOR", "KL_SLACK", "KL_SLACK_INT4"):
        assert got[name] == getattr(golden, name), name
    assert got["VLM_CRITERIA"] == list(golden.VLM_CRITERIA)
    text = swift("Golden.swift")
    # vlm_criteria's defaults and the fp32 criteria, as golden.py writes them
    assert '("teacher_forced_top1_agreement_min", .number(0.5)), ("kl_mean_max", .number(0.5))' in text
    assert golden.vlm_criteria("int4", []) == {"teacher_forced_top1_agreement_min": 0.5, "kl_mean_max": 0.5,
                                               "basis": "defaults (not measured)"}
    assert '("same_greedy_tokens", .bool(true)), ("teacher_forced_top1_agreement_min", .number(1.0))' in text
    assert golden.vlm_criteria("fp32", []) == {"same_greedy_tokens": True, "teacher_forced_top1_agreement_min": 1.0}
    assert "let eps = 1e-12" in text                      # coarse_kl's epsilon


def test_sampling_mask_image_and_crop_constants_equal_python():
    from edgevlm import generation
    from edgevlm.data import crops, images
    from edgevlm.processor import CLIP_MEAN, CLIP_STD, IMAGE_MARKER
    from edgevlm.runtime.vlm_ops import MASK_MIN

    gen = swift_consts(swift("Generation.swift"))
    assert gen["MAX_NEW_TOKENS"] == generation.MAX_NEW_TOKENS
    assert gen["MIN_TEMPERATURE"] == generation.MIN_TEMPERATURE and gen["MAX_TEMPERATURE"] == generation.MAX_TEMPERATURE
    mask = re.search(r"public let MASK_MIN: Float = (\S+)", swift("Generation.swift")).group(1)
    assert np.float32(mask) == np.float32(MASK_MIN)
    pre = swift_consts(swift("Preprocess.swift"))
    assert (pre["MIN_SIDE"], pre["MAX_SIDE"], pre["MAX_PIXELS"]) == (images.MIN_SIDE, images.MAX_SIDE, images.MAX_PIXELS)
    assert pre["MAX_FILE_BYTES"] == images.MAX_FILE_BYTES
    assert np.allclose(pre["CLIP_MEAN"], CLIP_MEAN, atol=0) and np.allclose(pre["CLIP_STD"], CLIP_STD, atol=0)
    assert (pre["OVERLAP_PATCH_SIZE"], pre["OVERLAP_MARGIN"], pre["OVERLAP_MAX_CROPS"], pre["OVERLAP_RESAMPLE"]) == (
        crops.OVERLAP_DEFAULTS["patch_size"], crops.OVERLAP_DEFAULTS["overlap_margin"],
        crops.OVERLAP_DEFAULTS["max_crops"], crops.OVERLAP_DEFAULTS["resample"])
    assert swift_consts(swift("VLMPipeline.swift"))["IMAGE_MARKER"] == IMAGE_MARKER
    # Pillow's fixed-point resampling: 32 - 8 - 2 precision bits (libImaging/Resample.c), bicubic a = -0.5
    text = swift("Preprocess.swift")
    assert "PRECISION_BITS = 32 - 8 - 2" in text and "let a = -0.5" in text
    assert '"lanczos": Filter(support: 3)' in text and '"bicubic": Filter(support: 2)' in text


def test_the_swift_tiles_port_follows_crops_py_and_the_kotlin_port():
    """Crops.swift (SmolVLM's idefics3_tiles): crops.py's constants and tokens, the functions of apps/android's Crops.kt
    (which tests/test_apps_android.py checks bit for bit against Python where kotlinc is installed), and the steps that
    carry numbers, compared as text (no Swift toolchain here)."""
    from edgevlm.data import crops

    text = swift("Crops.swift")
    c = swift_consts(text)
    assert (c["IDEFICS3_LONGEST_EDGE"], c["IDEFICS3_RESAMPLE"], c["IDEFICS3_MAX_SIDE"]) == (
        crops.IDEFICS3_DEFAULTS["longest_edge"], crops.IDEFICS3_DEFAULTS["resample"], crops.IDEFICS3_MAX_SIDE)
    assert "public let IDEFICS3_SPLITTING = true" in text and crops.IDEFICS3_DEFAULTS["splitting"] is True
    assert set(crops.IDEFICS3_DEFAULTS) == {"longest_edge", "splitting", "resample"}
    assert (c["FAKE_TOKEN"], c["GLOBAL_TOKEN"], c["IMAGE_TOKEN"]) == (crops.FAKE_TOKEN, crops.GLOBAL_TOKEN, crops.IMAGE_TOKEN)
    assert c["LAYOUT_RESAMPLE"] == list(crops._RESAMPLE)
    kt = (ROOT / "apps" / "android" / "edgevlm-android" / "src" / "main" / "kotlin" / "io" / "edgevlm" / "android"
          / "Crops.kt").read_text()
    names = re.findall(r"^(?:private )?fun (\w+)\(", kt, re.MULTILINE)
    assert {"idefics3TilesWithGrid", "idefics3TextRuns", "idefics3RunIds", "spliceViews", "fitLongest"} <= set(names)
    for name in names:
        assert re.search(rf"\bfunc {name}\(", text), name
    for step in ("h += h % 2", "w += w % 2", "let scale = 1.0 / 255.0", "Float(Double(img.rgb[i * 3 + ch]) * scale)",
                 'out.append((rows > 0 ? "\\n" : "") + FAKE_TOKEN + GLOBAL_TOKEN)', "(h, w) = tileMultiple(h, w, size)",
                 "let split = p.splitting && (h > size || w > size)"):
        assert step in text, step
    assert '"idefics3_tiles"' in swift("Preprocess.swift")
    pipeline = swift("VLMPipeline.swift")
    assert 'if imageSpec.mode == "idefics3_tiles" { return try prepareTiles(image, prompt) }' in pipeline
    assert '"pixel_values": try multiArray(px, [1, 3, s, s])' in pipeline


# -- Package.swift, app, README -----------------------------------------------------------------------------------------
def test_package_swift_pins_swift_transformers_exactly():
    text = (APP / "Package.swift").read_text()
    assert text.startswith("// swift-tools-version: 5.10") or text.startswith("// swift-tools-version: 6.0")
    assert ".iOS(.v18)" in text and ".macOS(.v15)" in text
    m = re.search(r'\.package\(url: "https://github\.com/huggingface/swift-transformers(?:\.git)?", exact: "(\d+\.\d+\.\d+)"\)', text)
    assert m, "swift-transformers must be pinned with exact: \"X.Y.Z\""
    assert '.product(name: "Tokenizers", package: "swift-transformers")' in text
    assert '.product(name: "Hub", package: "swift-transformers")' in text
    readme = README.read_text()
    assert m.group(1) in readme, "the README names the pinned swift-transformers release"
    imports = set(re.findall(r"^import (\w+)", swift(), re.MULTILINE))
    assert imports <= {"Foundation", "CoreML", "CoreGraphics", "ImageIO", "CryptoKit", "Tokenizers", "Hub",
                       "SwiftUI", "PhotosUI", "EdgeVLM", "PackageDescription"}, imports
    for f in PURE:                                         # the pure files stay free of Apple-only frameworks
        assert set(re.findall(r"^import (\w+)", swift(f), re.MULTILINE)) == {"Foundation"}, f
    app = "\n".join(p.read_text() for p in (APP / "App").rglob("*.swift"))
    assert "PhotosPicker(selection:" in app and "loadTransferable(type: Data.self)" in app
    assert "pipeline.generate(" in app and "pipeline.verify()" in app and "timeToFirstTokenS" in app
    assert "decodeTokensPerS" in app


def test_readme_is_honest_and_its_name_table_holds():
    text = README.read_text()
    head = text[:1500].lower()
    assert "not compiled" in head and "not run" in head
    for needle in ("edgevlm export --target ios --quant fp16 --out bundles/ios-fp16", "swift build",
                   "MLModel.compileModel(at:)", "makeState()", "prediction(from:using:)", "MLDictionaryFeatureProvider",
                   "AsyncThrowingStream", "PhotosPicker", "AutoTokenizer.from(tokenizerConfig:tokenizerData:",
                   "encode(text:addSpecialTokens:)", "decode(tokens:skipSpecialTokens:)", "SHA256",
                   "developer.apple.com", "test_real_ios_bundle_has_what_the_swift_code_reads"):
        assert needle in text, needle
    table = text.split("## Python ↔ Swift", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", table, re.MULTILINE)
    assert len(rows) >= 25
    sw = swift()
    for py, sname in rows:
        edgevlm_name(py)                                  # AttributeError names a Python name that is gone
        last = sname.split(".")[-1].split("(")[0]
        assert re.search(rf"\b(?:func|class|struct|enum|actor|let|var)\s+{re.escape(last)}\b", sw), sname


# -- swiftc (never on this machine) --------------------------------------------------------------------------------------
def test_the_foundation_only_files_type_check():
    swiftc = shutil.which("swiftc")
    if not swiftc:
        pytest.skip("swiftc is not installed here (no Swift toolchain on Linux CI); on a Mac: swift build in apps/ios")
    r = subprocess.run([swiftc, "-typecheck", *[str(LIB / f) for f in PURE]], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


# -- a real ios bundle ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ios_bundle(tmp_path_factory):
    import edgevlm

    path, manifest = edgevlm.export(target="ios", precision="fp16", out=str(tmp_path_factory.mktemp("ios") / "b"),
                                    quiet=True, overwrite=True)
    return Path(path), manifest


@pytest.mark.slow
def test_real_ios_bundle_has_what_the_swift_code_reads(ios_bundle):
    """Needs the ios VLM exporter (edgevlm/exporters/coreml_vlm.py; it FAILS on a tree where `edgevlm export
    --target ios` still refuses VLMs): the default model's ios FP16 bundle carries every key, part, file and Core ML
    input / output / state name (and element type) the Swift code reads."""
    path, manifest = ios_bundle
    assert manifest["task"] == "vlm" and manifest["target"]["format"] == "coreml" and manifest["target"]["name"] == "ios"
    for p in REQUIRED:
        dig(manifest, p)                                   # KeyError names what the bundle lacks
    for rec in manifest["files"].values():
        assert set(rec) >= FILE_RECORD
    parts = manifest["parts"]
    assert {"vision_encoder", "embed_tokens", "decoder_coreml"} <= set(parts) <= PARTS
    for name, rec in parts.items():
        assert set(rec) >= {"path", "format"}, name
    emb = parts["embed_tokens"]
    assert emb["format"] == "raw" and emb["details"]["dtype"] == "float16" and emb["details"]["byte_order"] == "little"
    vocab, hidden = emb["details"]["shape"]
    assert hidden == manifest["generation"]["hidden_size"]
    assert (path / emb["path"]).stat().st_size == vocab * hidden * 2          # an FP16 export: a float16 table
    dec = parts["decoder_coreml"]
    assert dec["format"] == "coreml" and dec["path"].endswith(".mlpackage")
    assert set(dec["details"]["states"]) == DECODER_STATES
    assert 0 < dec["details"]["max_prefill"] <= dec["details"]["context_length"]
    golden = json.loads((path / manifest["golden"]["path"]).read_text())
    assert golden["kind"] == "vlm" and GOLDEN_KEYS - {"kind", "cases"} <= {k for c in golden["cases"] for k in _all_keys(c)}
    used = keys_read(library())
    have = _all_keys(manifest) | _all_keys(golden) | TOKENIZER_JSON_KEYS | OVERLAP_OPTIONS | PARTS
    py = python_runtime_text()
    for key in used - have:                                # optional keys (Moondream's, LLaVA-Mini's) the runtime reads too
        assert f'"{key}"' in py, key
    ct = pytest.importorskip("coremltools")
    for name, inputs, outputs, states in (("vision_encoder", {"pixel_values"}, {"image_embeds"}, set()),
                                          ("decoder_coreml", set(DECODER_INPUTS), {"logits"}, DECODER_STATES)):
        spec = ct.models.MLModel(str(path / parts[name]["path"]), skip_model_load=True).get_spec()
        d = spec.description
        assert {i.name for i in d.input} >= inputs, name
        assert {o.name for o in d.output} >= outputs, name
        assert {s.name for s in d.state} == states, name
        if name == "decoder_coreml":                       # the element types the Swift code builds its arrays with
            arr = ct.proto.FeatureTypes_pb2.ArrayFeatureType
            types = {i.name: i.type.multiArrayType.dataType for i in d.input}
            assert types == {"inputs_embeds": arr.FLOAT32, "attention_mask": arr.FLOAT32, "position_ids": arr.INT32}
            assert {o.name: o.type.multiArrayType.dataType for o in d.output}["logits"] == arr.FLOAT32
        else:                                              # pixel_values (1, 3, size, size), as encodeImage shapes it
            size = manifest["generation"]["image"]["size"]
            assert list(d.input[0].type.multiArrayType.shape) == [1, 3, size, size]


def _all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_all_keys(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_all_keys(v) for v in obj)) if obj else set()
    return set()


@pytest.mark.slow
def test_the_swift_decoder_protocol_gives_the_python_runtimes_tokens(ios_bundle):
    """CoreMLDecoder.swift's feeding, in numpy on edgevlm's reference ML-program interpreter: a fresh state per
    conversation, the prompt fed in chunks of max_prefill positions (forced small here, so that the Swift-only chunked
    path runs), float32 embeddings and mask, int32 positions, steps embedded from the raw little-endian float16 table
    as RawEmbedding.rows reads it. Greedy tokens equal the Python runtime's own on the same bundle."""
    from edgevlm import runtime
    from edgevlm.generation import GenerationConfig, GenerationStats
    from edgevlm.runtime.mil import load_package
    from edgevlm.runtime.vlm_ops import attention_mask

    path, manifest = ios_bundle
    golden = json.loads((path / manifest["golden"]["path"]).read_text())
    case = golden["cases"][0]
    n_new = 8
    pipe = runtime.load(path)
    embeds, _, _, prefix = pipe.prepare(path / "golden" / case["image"], case["prompt"])
    want = list(pipe.decode_tokens(embeds, GenerationConfig(max_new_tokens=n_new, stop_ids=()), GenerationStats(), prefix))

    parts = manifest["parts"]
    vocab, hidden = parts["embed_tokens"]["details"]["shape"]
    raw = (path / parts["embed_tokens"]["path"]).read_bytes()
    table = np.frombuffer(raw, dtype="<f2").reshape(vocab, hidden)           # RawEmbedding.rows: little-endian float16
    prog = load_package(path / parts["decoder_coreml"]["path"])
    state, n_past = prog.new_state(), 0
    max_prefill = 5                                                          # the manifest says context_length

    def run(x: np.ndarray, pre: int) -> np.ndarray:                           # CoreMLDecoder.run
        nonlocal n_past
        s = x.shape[0]
        feeds = {"inputs_embeds": x.astype(np.float32)[None],
                 "attention_mask": attention_mask(s, n_past, pre if n_past == 0 else 0),
                 "position_ids": np.arange(n_past, n_past + s, dtype=np.int32)[None]}
        out = prog.predict(feeds, state)
        n_past += s
        return np.asarray(out["logits"], np.float32).reshape(-1)

    x = embeds[0]
    assert prefix <= max_prefill or prefix == 0
    start, logits = 0, None
    while start < x.shape[0]:                                                 # CoreMLDecoder.prefill, chunked
        logits = run(x[start:start + max_prefill], prefix)
        start += max_prefill
    got = []
    for _ in range(n_new):
        got.append(int(np.argmax(logits)))
        logits = run(table[[got[-1]]].astype(np.float32), 0)                  # CoreMLDecoder.step
    assert got == want
