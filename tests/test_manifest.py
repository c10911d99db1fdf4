"""manifest.json is parsed and validated against one schema (edgevlm.manifest): real bundles of both kinds
pass, and each of a corpus of broken manifests gives a one-line BundleError that names the bad key."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgevlm.errors import BundleError
from edgevlm.manifest import (GENERATION_VERSION, MAX_DEPTH, MAX_MANIFEST_BYTES, MANIFEST_SCHEMA,
                              load_manifest, parse_manifest, validate_manifest)

from test_vlm_bundle import HAVE_LLAMA, NO_GGUF, export  # the VLM bundle tests' own export helper

pytestmark = pytest.mark.usefixtures("no_writes_outside")   # see tests/conftest.py

WHERE = "manifest.json"
try:
    import gguf  # noqa: F401
    HAVE_GGUF = True
except ImportError:
    HAVE_GGUF = False


# -- real bundles: one of each kind and of each generation variant -----------------------------------------
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An INT8 classification bundle (calibration block, quantization details, measured accuracy)."""
    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig

    out = tmp_path_factory.mktemp("cls") / "fastvit-cpu-int8"
    export_bundle(ExportConfig(model="fastvit_t8", target="cpu", out=out,
                               quant=QuantConfig(precision="int8", calib_size=8)), quiet=True)
    return out


# edgevlm's own model (template prompt, encoder, bidirectional prefix; with a GGUF decoder where gguf and
# llama.cpp are here), Moondream (moondream prompt ids, crops: tower + projector), LLaVA-Mini (pre-fusion)
VLM_CASES = {"scenes": "edgevlm_scenes_tiny", "moondream": "moondream2_tiny", "llava_mini": "llava_mini_tiny"}


@pytest.fixture(scope="module")
def vlm_bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlm")
    out = {}

    def get(case: str):
        if case not in out:
            name = VLM_CASES[case]
            both = case == "scenes" and HAVE_GGUF and HAVE_LLAMA and name not in NO_GGUF
            out[case] = export(tmp, name, decoder="both" if both else "onnx")[0]
        return out[case]
    return get


@pytest.fixture(scope="module")
def manifests(classifier, vlm_bundles):
    """Each real bundle's manifest, as its bytes on disk; ``get(name)`` gives a fresh dict."""
    raw = {"classifier": (classifier / "manifest.json").read_bytes()}

    def get(name: str) -> dict:
        if name not in raw:
            raw[name] = (vlm_bundles(name) / "manifest.json").read_bytes()
        return json.loads(raw[name])
    get.raw = lambda name: (get(name), raw[name])[1]
    return get


@pytest.mark.parametrize("name", ["classifier", *VLM_CASES])
def test_real_bundles_pass(name, classifier, vlm_bundles):
    path = (classifier if name == "classifier" else vlm_bundles(name)) / "manifest.json"
    m = parse_manifest(path.read_bytes(), str(path))
    validate_manifest(m, str(path))
    assert load_manifest(path) == m == json.loads(path.read_text())
    if name == "classifier":
        assert m["task"] == "classification" and "calibration" in m
        return
    gen = m["generation"]
    assert m["task"] == "vlm" and gen.get("version", 1) <= GENERATION_VERSION
    if name == "scenes":
        assert gen["prompt"]["kind"] == "template" and "vision" not in gen and "vision_encoder" in m["parts"]
        if HAVE_GGUF and HAVE_LLAMA:   # GGUF details record the exporter's absolute scratch path: not a bundle path
            assert "decoder_gguf" in m["parts"]
    if name == "moondream":
        assert gen["prompt"]["kind"] == "moondream" and gen["vision"]["kind"] == "moondream_crops"
    if name == "llava_mini":
        assert "prefusion" in gen and "prefusion" in m["parts"]


def test_extra_keys_versions_and_text_forms_are_accepted(manifests):
    m = manifests("scenes")
    m["added_by_a_newer_edgevlm"] = {"anything": [1, {"x": None}]}
    m["generation"]["future_knob"] = 3
    m["parts"]["decoder"]["future_fact"] = "x"
    m["parts"]["a_new_part"] = {"path": m["parts"]["decoder"]["path"], "format": "onnx", "precision": "fp32"}
    validate_manifest(m, WHERE)
    m["generation"]["version"] = GENERATION_VERSION          # written by a version that records it
    validate_manifest(m, WHERE)
    m["generation"].pop("version")                            # bundles written before: version 1
    validate_manifest(m, WHERE)
    text = json.dumps(m)
    assert parse_manifest(text, WHERE) == parse_manifest(text.encode(), WHERE) == m
    assert parse_manifest("\ufeff" + text, WHERE) == m       # an editor's byte-order mark
    c = manifests("classifier")
    c["model"].pop("num_classes")                             # optional keys are optional
    c.pop("calibration")
    validate_manifest(c, WHERE)


def test_listing_in_files_is_left_to_bundle_resolve(manifests):
    """A well-formed path that the files table lacks passes here: bundle.resolve refuses it (with its containment
    checks, links included) before anything opens it, and names it in its own words."""
    m = manifests("scenes")
    m["parts"]["decoder"]["path"] = "sub/other.onnx"
    m["generation"]["tokenizer"] = "tok.json"
    validate_manifest(m, WHERE)


def test_the_schema_is_plain_data():
    assert MANIFEST_SCHEMA["type"] == "dict" and json.loads(json.dumps(MANIFEST_SCHEMA)) == MANIFEST_SCHEMA


def test_module_is_standard_library_only():
    code = ("import sys, edgevlm.manifest; bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'numpy', 'torch', 'onnx', 'onnxruntime', 'PIL', 'yaml'}); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- the corpus of broken manifests ------------------------------------------------------------------------
def _get(m, path):
    for k in path:
        m = m[k]
    return m


def put(*path_and_value):
    *path, value = path_and_value
    return lambda m: _get(m, path[:-1]).__setitem__(path[-1], value)


def drop(*path):
    return lambda m: _get(m, path[:-1]).pop(path[-1])


def rename_file(old: str, new: str):
    def f(m):
        m["files"][new] = m["files"].pop(old)
    return f


def first_stop_ids(m):
    m["generation"]["stop_ids"] = [1, 2, "x"]


def nest(n: int):
    def f(m):
        x: list = []
        for _ in range(n):
            x = [x]
        m["extra"] = x
    return f


# (id, bundle, mutation, what the message must say). Every message must also be one line and carry a fix.
DICT_CASES = [
    # both kinds: the envelope
    ("kind-wrong", "classifier", put("kind", "other-bundle"), "not an edgevlm manifest"),
    ("kind-missing", "scenes", drop("kind"), "not an edgevlm manifest"),
    ("schema-version-99", "classifier", put("schema_version", 99), "schema_version is 99"),
    ("schema-version-string", "classifier", put("schema_version", "1"),
     "schema_version must be an integer >= 1, got '1'"),
    ("schema-version-missing", "scenes", drop("schema_version"), "schema_version is missing"),
    ("task-missing", "classifier", drop("task"), "task is missing"),
    ("task-unknown", "classifier", put("task", "segmentation"), "task must be one of 'classification', 'vlm'"),
    ("precision-unknown", "scenes", put("precision", "int3"), "precision must be one of 'fp32'"),
    ("target-not-object", "classifier", put("target", "cpu"), "target must be an object, got 'cpu'"),
    ("target-name-missing", "scenes", drop("target", "name"), "target.name is missing"),
    ("target-providers-string", "classifier", put("target", "providers", "CPUExecutionProvider"),
     "target.providers must be a list of non-empty strings"),
    ("weights-string", "classifier", put("weights", "digits"), "weights must be an object"),
    ("weights-dataset-number", "scenes", put("weights", "dataset", 3), "weights.dataset must be a string or null"),
    ("model-name-missing", "classifier", drop("model", "name"), "model.name is missing"),
    ("model-params-negative", "scenes", put("model", "params", -1), "model.params must be an integer >= 0, got -1"),
    ("files-missing", "classifier", drop("files"), "files is missing"),
    ("files-list", "classifier", put("files", []), "files must be an object, got a list of 0"),
    ("files-dotdot", "classifier", rename_file("model.onnx", "../model.onnx"),
     "files key '../model.onnx' points outside the bundle"),
    ("files-absolute", "scenes", rename_file("decoder.onnx", "/etc/passwd"), "files key '/etc/passwd' points outside"),
    ("files-backslash", "classifier", rename_file("model.onnx", "sub\\model.onnx"), "backslash"),
    ("files-nul", "scenes", rename_file("tokenizer.json", "tokenizer.json\x00.png"), "NUL"),
    ("files-drive", "scenes", rename_file("tokenizer.json", "C:/tokenizer.json"), "drive"),
    ("sha256-short", "classifier", put("files", "model.onnx", "sha256", "abc123"),
     'files["model.onnx"].sha256 must be a sha256'),
    ("sha256-upper", "scenes", lambda m: m["files"]["decoder.onnx"].update(sha256="A" * 64),
     'files["decoder.onnx"].sha256'),
    ("size-negative", "classifier", put("files", "model.onnx", "size", -5),
     'files["model.onnx"].size must be an integer >= 0'),
    ("size-float", "scenes", put("files", "embed_tokens.onnx", "size", 1.5), 'files["embed_tokens.onnx"].size'),
    ("device-files-dotdot", "classifier", put("device_files", ["trt_cache/", "../model.plan"]), "device_files[1]"),
    ("accuracy-over-one", "classifier", put("accuracy", "bundle", 97.5),
     "accuracy.bundle must be a number >= 0 and <= 1"),
    # classification bundles
    ("labels-missing", "classifier", drop("labels"), "labels is missing"),
    ("labels-short", "classifier", lambda m: m["labels"].pop(), "labels must name all 10 classes"),
    ("labels-number", "classifier", put("labels", 3, 3), "labels[3] must be a string, got 3"),
    ("artifacts-empty", "classifier", put("artifacts", []), "artifacts must be a non-empty list"),
    ("artifact-path-absolute", "classifier", put("artifacts", 0, "path", "/tmp/model.onnx"), "artifacts[0].path"),
    ("artifact-path-empty", "classifier", put("artifacts", 0, "path", ""),
     "artifacts[0].path '' is not a relative path inside the bundle"),
    ("artifact-precision-missing", "classifier", drop("artifacts", 0, "precision"),
     "artifacts[0].precision is missing"),
    ("input-size-string", "classifier", put("preprocessing", "input_size", "64"), "preprocessing.input_size"),
    ("input-size-mismatch", "classifier", put("model", "input_size", 32), "model.input_size is 32"),
    ("model-input-size-missing", "classifier", drop("model", "input_size"), "model.input_size is missing"),
    ("crop-pct-range", "classifier", put("preprocessing", "crop_pct", 2), "preprocessing.crop_pct"),
    ("std-zero", "classifier", put("preprocessing", "std", [0, 0.2, 0.2]), "preprocessing.std[0] must be a number > 0"),
    ("mean-two", "classifier", put("preprocessing", "mean", [0.5, 0.5]),
     "preprocessing.mean must be a list of 3 numbers"),
    ("interpolation-unknown", "classifier", put("preprocessing", "interpolation", "lanczos9"),
     "preprocessing.interpolation"),
    ("calibration-images-negative", "classifier", put("calibration", "images", -1), "calibration.images"),
    # VLM bundles: the generation block
    ("stop-id-not-int", "scenes", first_stop_ids, "generation.stop_ids[2] must be an integer >= 0, got 'x'"),
    ("stop-ids-missing", "scenes", drop("generation", "stop_ids"), "generation.stop_ids is missing"),
    ("eos-negative", "scenes", put("generation", "eos_ids", [-1]), "generation.eos_ids[0]"),
    ("context-zero", "scenes", put("generation", "context_length", 0),
     "generation.context_length must be an integer >= 1, got 0"),
    ("context-string", "moondream", put("generation", "context_length", "2048"), "generation.context_length"),
    ("context-huge", "scenes", put("generation", "context_length", 10**400),
     "generation.context_length must be an integer >= 1 that fits in 64 bits"),
    ("stop-id-huge", "moondream", put("generation", "stop_ids", [2**63]), "generation.stop_ids[0]"),
    ("context-nan", "scenes", put("generation", "context_length", float("nan")), "generation.context_length"),
    ("crop-pct-nan", "classifier", put("preprocessing", "crop_pct", float("nan")), "preprocessing.crop_pct"),
    ("context-float", "llava_mini", put("generation", "context_length", 2048.0), "generation.context_length"),
    ("hidden-missing", "scenes", drop("generation", "hidden_size"), "generation.hidden_size is missing"),
    ("layers-bool", "scenes", put("generation", "num_layers", True),
     "generation.num_layers must be an integer >= 1, got True"),
    ("kv-heads-missing", "moondream", drop("generation", "num_kv_heads"), "generation.num_kv_heads is missing"),
    ("generation-version-99", "scenes", put("generation", "version", 99), "generation.version is 99"),
    ("generation-version-zero", "scenes", put("generation", "version", 0),
     "generation.version must be an integer >= 1"),
    ("generation-list", "scenes", put("generation", []), "generation must be an object"),
    ("generation-missing", "llava_mini", drop("generation"), "generation is missing"),
    ("image-missing", "scenes", drop("generation", "image"), "generation.image is missing"),
    ("image-size-negative", "scenes", put("generation", "image", "size", -3), "generation.image.size"),
    ("image-mean-short", "scenes", put("generation", "image", "mean", [0.5]), "generation.image.mean"),
    ("image-mode-unknown", "scenes", put("generation", "image", "mode", "tiles"), "generation.image.mode"),
    ("crops-resample", "moondream", put("generation", "image", "options", "resample", "box"),
     "generation.image.options.resample"),
    ("tokenizer-dotdot", "scenes", put("generation", "tokenizer", "../tokenizer.json"), "generation.tokenizer"),
    ("tokenizer-dot", "scenes", put("generation", "tokenizer", "./tokenizer.json"),
     "generation.tokenizer './tokenizer"),
    ("prompt-kind-missing", "scenes", drop("generation", "prompt", "kind"), "generation.prompt.kind is missing"),
    ("prompt-kind-unknown", "scenes", put("generation", "prompt", "kind", "chatml"),
     "generation.prompt.kind must be one of"),
    ("template-missing", "scenes", drop("generation", "prompt", "template"), "generation.prompt.template is missing"),
    ("template-no-prompt", "scenes", put("generation", "prompt", "template", "USER: <image> ASSISTANT:"),
     "generation.prompt.template must be a template"),
    ("bos-id-string", "scenes", put("generation", "prompt", "bos_id", "<s>"), "generation.prompt.bos_id"),
    ("moondream-prefix-missing", "moondream", drop("generation", "prompt", "prefix"),
     "generation.prompt.prefix is missing"),
    ("moondream-suffix-bad", "moondream", put("generation", "prompt", "suffix", [1, None]),
     "generation.prompt.suffix[1]"),
    ("moondream-bos-null", "moondream", put("generation", "prompt", "bos_id", None), "generation.prompt.bos_id"),
    ("vision-kind-unknown", "moondream", put("generation", "vision", "kind", "pyramid"), "generation.vision.kind"),
    ("vision-margin-negative", "moondream", put("generation", "vision", "margin", -1), "generation.vision.margin"),
    ("vision-side-missing", "moondream", drop("generation", "vision", "side"), "generation.vision.side is missing"),
    ("crops-without-tower", "scenes", put("generation", "vision", {"kind": "moondream_crops", "side": 2, "margin": 1}),
     "parts.vision_tower is missing"),
    ("encoder-part-missing", "scenes", drop("parts", "vision_encoder"), "parts.vision_encoder is missing"),
    ("projector-missing", "moondream", drop("parts", "vision_projector"), "parts.vision_projector is missing"),
    ("prefusion-without-part", "scenes", put("generation", "prefusion", {"n_tokens": 1}), "parts.prefusion is missing"),
    ("prefusion-null", "llava_mini", put("generation", "prefusion", None), "generation.prefusion must be an object"),
    ("prefusion-zero", "llava_mini", put("generation", "prefusion", "n_tokens", 0), "generation.prefusion.n_tokens"),
    ("prefusion-skip-ids", "llava_mini", put("generation", "prefusion", "skip_ids", ["a"]),
     "generation.prefusion.skip_ids[0]"),
    # VLM bundles: parts, model, parity
    ("parts-missing", "scenes", drop("parts"), "parts is missing"),
    ("embed-missing", "scenes", drop("parts", "embed_tokens"), "parts.embed_tokens is missing"),
    ("no-decoder", "moondream", lambda m: [m["parts"].pop(k, None) for k in ("decoder", "decoder_gguf")],
     "parts must hold decoder or decoder_gguf"),
    ("part-path-windows", "scenes", put("parts", "decoder", "path", "C:\\decoder.onnx"), "parts.decoder.path"),
    ("part-path-control", "llava_mini", put("parts", "prefusion", "path", "pre\nfusion.onnx"), "parts.prefusion.path"),
    ("part-precision-number", "scenes", put("parts", "decoder", "precision", 16), "parts.decoder.precision"),
    ("part-not-object", "scenes", put("parts", "embed_tokens", "embed_tokens.onnx"),
     "parts.embed_tokens must be an object"),
    ("vision-tokens-missing", "scenes", drop("model", "vision_tokens"), "model.vision_tokens is missing"),
    ("parity-kl-string", "scenes", put("parity", "results", 0, "kl_mean", "low"), "parity.results[0].kl_mean"),
    ("parity-backend-missing", "moondream", drop("parity", "results", 0, "backend"),
     "parity.results[0].backend is missing"),
    ("parity-eager-tokens", "scenes", put("parity", "eager_tokens", "1 2 3"), "parity.eager_tokens"),
    ("vlm-artifact-path", "scenes", put("artifacts", 0, "path", "/abs.onnx"), "artifacts[0].path '/abs.onnx' points"),
    ("deep-inside-dict", "scenes", nest(5000), "extra"),   # validate_manifest on a dict never parsed: no recursion
]


# a newer edgevlm may write these: the fix says to upgrade
UPGRADE = {"schema-version-99", "task-unknown", "generation-version-99", "prompt-kind-unknown", "vision-kind-unknown"}


@pytest.mark.parametrize("case, bundle_name, mutate, needle", DICT_CASES, ids=[c[0] for c in DICT_CASES])
def test_broken_manifest_names_the_key(manifests, case, bundle_name, mutate, needle):
    m = manifests(bundle_name)
    mutate(m)
    if needle == "extra":           # deeply nested unknown data: allowed, and walking it must not recurse
        validate_manifest(m, WHERE)
        return
    with pytest.raises(BundleError) as info:
        validate_manifest(m, WHERE)
    msg = str(info.value)
    assert needle in msg, msg
    assert msg.startswith(WHERE) and "\n" not in msg and info.value.fix, msg
    assert ("upgrade edgevlm" in info.value.fix) == (case in UPGRADE), msg


def _deep(n: int) -> bytes:
    return b'{"kind": "edgevlm-bundle", "x": ' + b"[" * n + b"]" * n + b"}"


def _padded(raw: bytes, size: int) -> bytes:
    return raw[:-2] + b" " * (size - len(raw)) + raw[-2:]


def _non_utf8(raw: bytes) -> bytes:
    i = raw.index(b'"model"')
    return raw[:i + 1] + b"\xff\xfe" + raw[i + 1:]


BYTES_CASES = [
    ("nesting-10000", lambda raw: _deep(10_000), f"nests more than {MAX_DEPTH} levels"),
    ("nesting-1000000", lambda raw: b"[" * 1_000_000, f"nests more than {MAX_DEPTH} levels"),
    ("nesting-just-over", lambda raw: _deep(MAX_DEPTH), f"nests more than {MAX_DEPTH} levels"),
    ("20-mib", lambda raw: _padded(raw, 20 << 20), "is over 16 MiB"),
    ("20-mib-text", lambda raw: _padded(raw, 20 << 20).decode(), "is over 16 MiB"),
    ("non-utf8", _non_utf8, "is not UTF-8 text (byte 0xff"),
    ("latin1", lambda raw: raw.replace(b'"model"', '"modèl"'.encode("latin-1"), 1), "is not UTF-8 text"),
    ("top-level-list", lambda raw: b"[" + raw + b"]", "holds a JSON list, not an object"),
    ("top-level-string", lambda raw: b'"manifest"', "holds a JSON string, not an object"),
    ("top-level-null", lambda raw: b"null", "holds a JSON null"),
    ("empty-file", lambda raw: b"", "is not valid JSON"),
    ("truncated", lambda raw: raw[: len(raw) // 2], "is not valid JSON"),
    ("trailing-garbage", lambda raw: raw + b"}", "is not valid JSON (Extra data"),
    ("huge-integer", lambda raw: b'{"kind": ' + b"9" * 5000 + b"}", "is not valid JSON"),
    ("not-bytes", lambda raw: 12, "not text"),
]


@pytest.mark.parametrize("mutate, needle", [c[1:] for c in BYTES_CASES], ids=[c[0] for c in BYTES_CASES])
def test_unparseable_manifest_is_one_line(manifests, mutate, needle):
    manifests("classifier")
    with pytest.raises(BundleError) as info:
        parse_manifest(mutate(manifests.raw("classifier")), WHERE)
    msg = str(info.value)
    assert needle in msg and msg.startswith(WHERE) and "\n" not in msg and info.value.fix, msg


def test_depth_limit_is_exact():
    ok = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    assert parse_manifest(b'{"x": ' + ok + b"}", WHERE)["x"] == json.loads(ok)
    assert len(_padded(b"{}", MAX_MANIFEST_BYTES)) == MAX_MANIFEST_BYTES
    assert parse_manifest(_padded(b"{}", MAX_MANIFEST_BYTES), WHERE) == {}


def test_load_manifest_reads_at_most_the_limit(tmp_path, manifests):
    p = tmp_path / "manifest.json"
    p.write_bytes(_padded(manifests.raw("scenes"), MAX_MANIFEST_BYTES + 4096))
    with pytest.raises(BundleError, match="is over 16 MiB"):
        load_manifest(p)
    with pytest.raises(BundleError, match="cannot read"):
        load_manifest(tmp_path / "nothing.json")
    (tmp_path / "link.json").symlink_to(p)
    with pytest.raises(BundleError, match="not a regular file"):
        load_manifest(tmp_path / "link.json")


@pytest.mark.parametrize("name", ["classifier", "scenes", "moondream", "llava_mini"])
def test_every_key_replaced_by_junk_gives_a_bundle_error_or_passes(manifests, name):
    """Sweep: each value of the manifest (outside free-form blocks) swapped for each kind of junk; the validator
    either accepts it (an optional key that allows it) or raises BundleError, never anything else."""
    base = manifests(name)
    junk = [None, "x", -1, 1.5, True, [], {}, [None], {"k": None}, "../x", "/abs", 10**30, float("nan"), float("inf")]
    seen = 0

    def walk(node, path):
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))[:3]
        else:
            return
        for k, v in items:
            if path and path[0] in ("versions", "reparameterization") or "details" in path:
                continue
            yield path + [k]
            yield from walk(v, path + [k])

    text = json.dumps(base)
    for path in walk(base, []):
        for j in junk:
            m = json.loads(text)
            _get(m, path[:-1])[path[-1]] = j
            try:
                validate_manifest(m, WHERE)
            except BundleError as e:
                assert "\n" not in str(e)
            seen += 1
    assert seen > 200
