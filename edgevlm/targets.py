"""Target device profiles, read from export/*.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import yaml

from .config import DecoderChoice, DecoderInt4, DecoderInt8, Precision, Rewrite
from .errors import ConfigError
from .registry import Registry
from .resources import targets_dir


@dataclass(frozen=True)
class VLMProfile:
    """How a target takes a VLM (its profile's ``vlm`` block): the decoder formats it may carry, the FP32
    decoder's graph rewrites and the decoder's INT8/INT4 methods. Image-side parts follow the profile's own
    ``int8`` rules."""

    decoders: tuple[str, ...]
    default_decoder: DecoderChoice = DecoderChoice.ONNX    # what --decoder means when it is not given
    rewrites: tuple[Rewrite, ...] = ()
    decoder_int8: DecoderInt8 = DecoderInt8.DYNAMIC
    decoder_int4: DecoderInt4 = DecoderInt4.MATMULNBITS
    precisions: tuple[Precision, ...] = ()     # VLM bundles take only these (empty: the target's precisions)
    precisions_why: str = ""                   # why, named when a precision is refused

    @classmethod
    def from_dict(cls, d: dict, target: str) -> "VLMProfile":
        unknown = set(d) - {"decoders", "default_decoder", "rewrites", "decoder_int8", "decoder_int4", "precisions",
                            "precisions_why"}
        if unknown:
            raise ConfigError(f"target {target}: unknown vlm key(s) {sorted(unknown)}", "fix export/" + target + ".yaml")
        decoders = tuple(DecoderChoice.parse(x).value for x in d.get("decoders", ("onnx",)))
        if not decoders or "both" in decoders:
            raise ConfigError(f"target {target}: vlm.decoders must list onnx and/or gguf", f"fix export/{target}.yaml")
        default = DecoderChoice.parse(d.get("default_decoder", decoders[0]))
        if any(f not in decoders for f in default.formats()):
            raise ConfigError(f"target {target}: vlm.default_decoder {default.value} is not among vlm.decoders "
                              f"({', '.join(decoders)})", f"fix export/{target}.yaml")
        return cls(decoders, default, tuple(Rewrite.parse(r) for r in d.get("rewrites") or ()),
                   DecoderInt8.parse(d.get("decoder_int8", "dynamic")), DecoderInt4.parse(d.get("decoder_int4", "matmulnbits")),
                   tuple(Precision.parse(p) for p in d.get("precisions") or ()), str(d.get("precisions_why") or ""))

    def check_precision(self, p: Precision, target: str) -> None:
        if self.precisions and p not in self.precisions:
            raise ConfigError(f"target {target} does not take VLMs at {p.value}"
                              + (f" ({self.precisions_why})" if self.precisions_why else ""),
                              f"use --quant {' | '.join(x.value for x in self.precisions)}")

    def check_decoder(self, choice: DecoderChoice, target: str) -> None:
        missing = [f for f in choice.formats() if f not in self.decoders]
        if missing:
            raise ConfigError(f"target {target} does not take a {' or '.join(missing).upper()} decoder",
                              f"use --decoder {' | '.join(self.decoders)}")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    format: str                     # onnx | ort | coreml
    runtime: str                    # onnxruntime | tensorrt | coreml
    precisions: tuple[Precision, ...]
    default_precision: Precision
    batch: dict
    providers: tuple[str, ...] = ()
    int8: dict = field(default_factory=dict)
    int4: dict = field(default_factory=dict)
    tensorrt: dict = field(default_factory=dict)
    minimum_deployment_target: dict = field(default_factory=dict)
    compute_units: str | None = None
    vlm: VLMProfile | None = None          # None: VLM bundles are not written for this target yet

    def require_vlm(self) -> VLMProfile:
        if self.vlm is None:
            raise ConfigError(f"VLM bundles for target {self.name} ({self.format}) are not written yet: its profile "
                              f"(export/{self.name}.yaml) has no vlm block",
                              f"export with --target {' or '.join(t.name for t in list_targets() if t.vlm)}")
        return self.vlm

    def int8_options(self) -> dict:
        """The profile's static INT8 rules as :func:`edgevlm.compress.quantize.to_int8` keywords."""
        s = self.int8
        return {"symmetric_activations": bool(s.get("symmetric_activations", False)),
                "activations": s.get("activations", "uint8"), "op_types": s.get("op_types"),
                "quantize_bias": bool(s.get("quantize_bias", True)),
                "exclude_depthwise": bool(s.get("exclude_depthwise", False)),
                "exclude_activation_matmuls": bool(s.get("exclude_activation_matmuls", False))}

    def check_precision(self, precision: Precision) -> None:
        if precision not in self.precisions:
            raise ConfigError(
                f"target {self.name} does not support {precision}",
                f"use --quant {' | '.join(p.value for p in self.precisions)}",
            )

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "format": self.format, "runtime": self.runtime,
             "batch": self.batch}
        for k in ("tensorrt", "minimum_deployment_target"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.providers:
            d["providers"] = list(self.providers)
        return d

    def vlm_dict(self) -> dict:
        """The ``vlm`` block as recorded in a VLM bundle's manifest."""
        v = self.require_vlm()
        return {"decoders": list(v.decoders), "default_decoder": v.default_decoder.value, "rewrites": [r.value for r in v.rewrites],
                "decoder_int8": v.decoder_int8.value, "decoder_int4": v.decoder_int4.value,
                **({"precisions": [p.value for p in v.precisions]} if v.precisions else {})}


TARGETS: Registry[TargetProfile] = Registry("target")


@lru_cache(maxsize=None)
def _load() -> Registry[TargetProfile]:
    for path in sorted(targets_dir().glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        d["precisions"] = tuple(Precision.parse(p) for p in d["precisions"])
        d["default_precision"] = Precision.parse(d["default_precision"])
        d["providers"] = tuple(d.get("providers", ()))
        if d.get("vlm") is not None:
            d["vlm"] = VLMProfile.from_dict(d["vlm"], d["name"])
        TARGETS.add(d["name"], TargetProfile(**d))
    return TARGETS


def get_target(name: str) -> TargetProfile:
    return _load().get(name)


def list_targets() -> list[TargetProfile]:
    reg = _load()
    return [reg.get(n) for n in reg.names()]
