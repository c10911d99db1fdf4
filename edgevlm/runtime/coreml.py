"""Core ML VLM bundles (target ios) in the Python runtime.

Core ML itself runs only on Apple devices; here every package is run by edgevlm's reference ML-program interpreter
(:mod:`edgevlm.runtime.mil`, numpy, in the program's own dtypes), and the backend's name says so. The classes mirror
the ONNX ones (``_Graph``, ``OrtDecoder`` in :mod:`edgevlm.runtime.vlm`) so the pipeline, the parity checks and the
golden cases run an ios bundle like any other; apps/ios does the same steps with Core ML on the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, first_line
from .vlm_ops import attention_mask

INTERPRETER = "edgevlm reference ML-program interpreter (numpy), not Core ML"
REFERENCE_ENV = "EDGEVLM_COREML_REFERENCE"     # =1: the interpreter even where Core ML runs (macOS)


def _apple_model(path: Path):
    """Core ML itself (coremltools' MLModel, which compiles the package) on macOS, else None. coremltools 8+:
    ``MLModel.predict(data, state=None)`` and ``MLModel.make_state()`` (stateful programs, macOS 15). Not run in this
    repository's CI (no macOS)."""
    import os
    import sys

    if sys.platform != "darwin" or os.environ.get(REFERENCE_ENV) == "1":
        return None
    try:
        import coremltools as ct
    except ImportError:
        return None
    try:
        return ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
    except Exception as e:  # noqa: BLE001 -- Core ML's own errors
        raise BundleError(f"Core ML cannot load {Path(path).name}: {first_line(e)}",
                          f"re-export the bundle, or set {REFERENCE_ENV}=1 to use edgevlm's reference interpreter") from None


def open_program(path: Path):
    """A package as a program with ``inputs``, ``outputs``, ``states``, ``new_state()`` and ``predict(feeds,
    state)``: Core ML itself on macOS (:class:`_AppleProgram`), else edgevlm's reference interpreter."""
    apple = _apple_model(path)
    if apple is not None:
        d = apple.get_spec().description
        return _AppleProgram(apple, [i.name for i in d.input], [o.name for o in d.output],
                             tuple(st.name for st in d.state))
    from .mil import load_package

    prog = load_package(path)
    if prog.uncovered:
        raise BundleError(f"{Path(path).name} uses ops edgevlm's reference interpreter does not cover: "
                          f"{', '.join(prog.uncovered)}", "run the bundle on an Apple device (apps/ios), or report it")
    return prog


class CoreMLGraph:
    """One ``.mlpackage`` part, called with named inputs like :class:`edgevlm.runtime.vlm._Graph`."""

    backend = INTERPRETER
    min_rows = 1              # a flexible dimension of a Core ML input is at least 1

    def __init__(self, path: Path, providers=None, precision: str = "fp16", threads: int | None = None,
                 expect: tuple[str, ...] = (), **_):
        self.path = Path(path)
        self.program = open_program(self.path)
        if isinstance(self.program, _AppleProgram):       # Core ML on macOS: same names, its kernels
            self.backend = "Core ML (MLModel.predict)"
        self.outputs = list(self.program.outputs)
        missing = [n for n in expect if n not in self.program.inputs]
        if missing:
            raise BundleError(f"{self.path.name} is not the program this part needs: it lacks the input(s) "
                              f"{', '.join(missing[:4])}", "re-export the bundle with `edgevlm export`")

    def __call__(self, **feeds) -> list[np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.program.inputs}
        try:
            out = self.program.predict(feeds)
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 -- numpy errors inside an op
            raise BundleError(f"the reference interpreter failed running {self.path.name}: {first_line(e)}",
                              "re-export the bundle with `edgevlm export`; if it persists, report it") from None
        arrays = [np.asarray(out[n]) for n in self.outputs]
        return [a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a for a in arrays]


class _AppleProgram:
    """Core ML's MLModel behind the interpreter's interface (inputs, outputs, states, new_state, predict)."""

    def __init__(self, model, inputs: list[str], outputs: list[str], states: tuple[str, ...] = ()):
        self.model, self.inputs, self.outputs, self.states = model, {n: None for n in inputs}, outputs, states

    def new_state(self):
        return self.model.make_state() if self.states else None

    def predict(self, feeds: dict, state=None) -> dict:
        feeds = {k: (v.astype(np.int32) if np.asarray(v).dtype.kind in "iub" else np.asarray(v, np.float32))
                 for k, v in feeds.items()}
        return self.model.predict(feeds, state) if state is not None else self.model.predict(feeds)


class RawEmbedding:
    """``embed_tokens.f16`` / ``.f32``: the token embedding table, little-endian and row-major, looked up by id."""

    outputs = ["inputs_embeds"]

    def __init__(self, path: Path, details: dict):
        self.path = Path(path)
        dtype, shape = details.get("dtype"), details.get("shape")
        if dtype not in ("float16", "float32") or not (isinstance(shape, list) and len(shape) == 2
                                                        and all(isinstance(s, int) and s > 0 for s in shape)):
            raise BundleError(f"{self.path.name}: the manifest gives no valid dtype/shape for the embedding table",
                              "re-export the bundle with `edgevlm export`")
        want = shape[0] * shape[1] * np.dtype(dtype).itemsize
        have = self.path.stat().st_size
        if have != want:
            raise BundleError(f"{self.path.name} holds {have} bytes, not the {want} of a {dtype} {shape[0]}x{shape[1]} "
                              "table", "copy the whole bundle directory again, or re-export")
        self.table = np.memmap(self.path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=tuple(shape))

    def __call__(self, input_ids) -> list[np.ndarray]:
        ids = np.asarray(input_ids).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.table.shape[0]):
            raise BundleError(f"token id {int(ids.max())} is outside the embedding table ({self.table.shape[0]} rows)",
                              "use the bundle's own tokenizer.json")
        return [np.asarray(self.table[ids], np.float32)]


class CoreMLDecoder:
    """``decoder.mlpackage``: the stateful decoder. One state (``key_cache``/``value_cache``) per sequence; each call
    feeds the new positions' embeddings, the additive mask over all positions so far, and their positions; the
    program writes its keys and values into the state. Same interface as :class:`edgevlm.runtime.vlm.OrtDecoder`."""

    name = "coreml-reference"
    parity_key = "coreml"          # runtime.vlm_ops.DECODERS: the backend the export's parity records name

    def __init__(self, path: Path, embed, context: int):
        self.path, self.embed, self.context = Path(path), embed, int(context)
        self.program = open_program(self.path)
        if isinstance(self.program, _AppleProgram):       # Core ML on macOS 15+: make_state / predict(data, state)
            self.name = "coreml"
        need = ("inputs_embeds", "attention_mask", "position_ids")
        missing = [n for n in need if n not in self.program.inputs] + \
            [s for s in ("key_cache", "value_cache") if s not in self.program.states]
        if missing or "logits" not in self.program.outputs:
            raise BundleError(f"{self.path.name} is not a stateful decoder: it lacks {', '.join(missing) or 'logits'}",
                              "re-export the bundle with `edgevlm export --target ios`")
        self.gives_hidden = "hidden" in self.program.outputs
        self.kernel = {"decode_kernel": "reference interpreter", "decode_kernel_why": INTERPRETER}
        self.reset()

    def reset(self) -> None:
        self.n_past = 0
        self.state = self.program.new_state()
        self.last_hidden: np.ndarray | None = None

    def _run(self, embeds: np.ndarray, prefix: int = 0) -> np.ndarray:
        s = embeds.shape[1]
        if self.n_past + s > self.context:
            raise BundleError(f"the sequence needs {self.n_past + s} positions; the decoder's state holds "
                              f"{self.context}", "ask a shorter question or fewer new tokens, or re-export with a "
                              "longer --context")
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                 "attention_mask": attention_mask(s, self.n_past, prefix if self.n_past == 0 else 0),
                 "position_ids": np.arange(self.n_past, self.n_past + s, dtype=np.int32)[None]}
        out = self.program.predict(feeds, self.state)
        if self.gives_hidden:
            self.last_hidden = np.asarray(out["hidden"], np.float32).reshape(-1)
        self.n_past += s
        return np.asarray(out["logits"], np.float32).reshape(-1)

    def prefill(self, embeds: np.ndarray, prefix: int = 0) -> np.ndarray:
        return self._run(embeds.reshape(1, -1, embeds.shape[-1]), prefix)

    def step(self, token: int) -> np.ndarray:
        return self._run(self.embed(input_ids=np.array([[token]], np.int64))[0].reshape(1, 1, -1))

    def step_embeds(self, embeds: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(embeds, np.float32).reshape(1, 1, -1))

    def close(self) -> None:
        self.state = None
