"""Typed options shared by the library and the CLI (the CLI builds these in one place)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import ConfigError
from .registry import suggest


_LABELS = {"DecoderChoice": "decoder", "DecoderInt8": "INT8 decoder method", "DecoderInt4": "INT4 decoder method",
           "CalibMethod": "calibration method", "Rewrite": "graph rewrite"}   # how errors name each choice


class _Choice(str, Enum):
    @classmethod
    def parse(cls, value: "str | _Choice") -> "_Choice":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = [m.value for m in cls]
            raise ConfigError(
                f"unknown {_LABELS.get(cls.__name__, cls.__name__.lower())} {value!r}.{suggest(str(value), names)}",
                f"choose one of: {', '.join(names)}",
            ) from None

    def __str__(self) -> str:
        return self.value


class Precision(_Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class DecoderChoice(_Choice):
    """Which decoders a VLM bundle carries: ONNX (ONNX Runtime / TensorRT), GGUF (llama.cpp), both, or Core ML."""

    ONNX = "onnx"
    GGUF = "gguf"
    COREML = "coreml"     # a stateful Core ML program (iOS 18)
    BOTH = "both"         # onnx and gguf

    def formats(self) -> tuple[str, ...]:
        return ("onnx", "gguf") if self is DecoderChoice.BOTH else (self.value,)


class DecoderInt8(_Choice):
    """How a target quantizes a VLM decoder to INT8 (its profile's ``vlm.decoder_int8``)."""

    DYNAMIC = "dynamic"           # MatMulInteger, activations quantized at run time (ONNX Runtime)
    WEIGHTS_QDQ = "weights_qdq"   # per-channel symmetric INT8 DequantizeLinear on MatMul weights (TensorRT)


class DecoderInt4(_Choice):
    """How a target quantizes a VLM decoder to INT4 (its profile's ``vlm.decoder_int4``)."""

    MATMULNBITS = "matmulnbits"   # ONNX Runtime's MatMulNBits
    QDQ = "qdq"                   # blocked INT4 DequantizeLinear (opset 21), TensorRT's weight-only INT4


class Rewrite(_Choice):
    """Graph rewrites a target profile may name for a VLM decoder (``vlm.rewrites``)."""

    ATTENTION_FUSION = "attention_fusion"     # GroupQueryAttention over a KV buffer shared in place (ONNX Runtime)


class CalibMethod(_Choice):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


@dataclass
class QuantConfig:
    """How to quantize. INT8: static, per-channel weights, QDQ. INT4: block-wise weight-only."""

    precision: Precision | None = None  # None: the target profile's default
    calib: str | None = None            # a folder of images, or builtin:digits / builtin:photos
    calib_method: CalibMethod = CalibMethod.MINMAX
    calib_size: int = 64                # images used for calibration
    block_size: int = 32                # INT4 block length along the reduction axis

    def __post_init__(self) -> None:
        if self.precision is not None:
            self.precision = Precision.parse(self.precision)
        self.calib_method = CalibMethod.parse(self.calib_method)
        if self.calib_size < 1:
            raise ConfigError(f"--calib-size must be at least 1, got {self.calib_size}", "pass a positive count")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(
                f"INT4 block size must be a power of two >= 16, got {self.block_size}", "use 32, 64 or 128"
            )


@dataclass
class ExportConfig:
    """Everything `edgevlm export` needs to build one bundle."""

    model: str
    target: str = "cpu"
    quant: QuantConfig = field(default_factory=QuantConfig)
    weights: str | None = None          # path, hub id, shipped tag, or "random"; None = recipe default
    num_classes: int | None = None
    img_size: int | None = None
    out: Path | None = None
    opset: int = 20                    # 20: native Gelu (a fifth faster on CPU than the Erf pattern)
    seed: int = 0
    validate_accuracy: bool = True      # when the weights carry a labelled evaluation set
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"--num-classes must be positive, got {self.num_classes}", "pass e.g. --num-classes 10")
        if self.img_size is not None and (self.img_size % 32 or not 32 <= self.img_size <= 1024):
            raise ConfigError(
                f"input size {self.img_size} is out of range",
                "use a multiple of 32 between 32 and 1024 (e.g. 224 or 256)",
            )
        if self.opset < 17:
            raise ConfigError(f"ONNX opset {self.opset} is too old", "use --opset 17 or newer")
        if self.out is not None:
            self.out = Path(self.out)


@dataclass
class VLMExportConfig:
    """Everything `edgevlm export` needs to build one VLM bundle (the CLI builds it in one place)."""

    model: str
    weights: str | None = None          # path, hub id, or "random"; None = recipe default
    revision: str | None = None
    target: str = "cpu"
    precision: Precision | None = None  # None: the target profile's default
    decoder: DecoderChoice | None = None    # None: the target profile's vlm.default_decoder
    out: Path | None = None
    overwrite: bool = False
    calib: str | None = None            # images for the vision encoder's INT8 calibration
    calib_size: int = 64                # images (families with crops give several views each, capped at
                                        # build_vlm.calibration_view_cap views spread over all images)
    block_size: int = 32                # INT4 block length along the reduction axis
    parity_tokens: int = 32             # greedy tokens compared with eager through the runtime
    opset: int = 18
    device: str | None = None           # a Jetson module (export/devices/NAME.yaml): the bundle must fit it
    context: int | None = None          # positions the bundle's KV cache holds (None: the model's maximum)

    def __post_init__(self) -> None:
        if self.precision is not None:
            self.precision = Precision.parse(self.precision)
        if self.context is not None and (isinstance(self.context, bool) or not isinstance(self.context, int)
                                         or not 16 <= self.context <= 1 << 20):
            raise ConfigError(f"--context must be a whole number of positions from 16 to {1 << 20}, got "
                              f"{self.context!r}", "pass e.g. --context 2048")
        if self.device is not None and self.target != "jetson":
            raise ConfigError(f"--device {self.device} names a Jetson module; target {self.target} has none",
                              "export with --target jetson, or drop --device")
        if self.decoder is not None:
            self.decoder = DecoderChoice.parse(self.decoder)
        # the same checks as the classifier's options (one rule for each)
        QuantConfig(precision=self.precision, calib_size=self.calib_size, block_size=self.block_size)
        if not 1 <= self.parity_tokens <= 4096:
            raise ConfigError(f"parity tokens must be 1..4096, got {self.parity_tokens}", "pass e.g. 32")
        if self.opset < 17:
            raise ConfigError(f"ONNX opset {self.opset} is too old", "use --opset 17 or newer")
        if self.out is not None:
            self.out = Path(self.out)
