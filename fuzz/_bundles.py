"""Real bundles for the manifest and bundle harnesses, made once and cached in ``$EDGEVLM_FUZZ_CACHE``.

- ``vlm``: ``edgevlm_scenes_tiny`` with random weights, exported as edgevlm exports it (ONNX vision encoder,
  embeddings and decoder, ``tokenizer.json``, and a GGUF decoder when llama-cpp-python is installed): about a
  minute on 2 cores, once.
- ``classification``: a classification bundle whose manifest is a real export's (``fuzz/corpus/manifest/
  classification.json``, from ``fastvit_t8``) around a tiny ONNX classifier built here with onnx.helper (the
  real one is 13 MB; the loader's code paths are the same).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import _common

CLF_TEMPLATE = _common.HERE / "corpus" / "manifest" / "classification.json"
VERSION = "2"                      # bump to rebuild the cached bundles (2: VLM bundles with golden cases)


def _tiny_classifier(path: Path, classes: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, classes)).astype(np.float32).ravel()
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, classes], weights)
    b = helper.make_tensor("b", TensorProto.FLOAT, [classes], np.zeros(classes, np.float32))
    nodes = [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                             ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def classification_bundle() -> Path:
    from edgevlm.bundle import MANIFEST, file_table

    out = _common.cache_dir() / f"classification-tiny-v{VERSION}"
    if (out / MANIFEST).is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = json.loads(CLF_TEMPLATE.read_text())
    _tiny_classifier(tmp / m["artifacts"][0]["path"], int(m["model"]["num_classes"]))
    m["files"] = file_table(tmp)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def vlm_bundle() -> Path:
    from edgevlm.bundle import MANIFEST

    try:
        import llama_cpp  # noqa: F401
        import gguf  # noqa: F401
        decoder = "both"
    except ImportError:
        decoder = "onnx"
    out = _common.cache_dir() / f"edgevlm_scenes_tiny-{decoder}-v{VERSION}"
    if (out / MANIFEST).is_file():
        return out
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle

    print(f"[fuzz] exporting edgevlm_scenes_tiny ({decoder}) once to {out} (about a minute)", flush=True)
    export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", precision="fp32",
                                      decoder=decoder, out=str(out), overwrite=True, parity_tokens=4), quiet=True)
    return out


def bundles() -> dict[str, Path]:
    return {"classification": classification_bundle(), "vlm": vlm_bundle()}


def link_copy(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` with hard links (files are replaced, never written in place, by the harnesses)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=_link)
    return dst


def _link(a, b):
    import os

    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (never through a hard link into the cache)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)
