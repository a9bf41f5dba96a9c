"""Quantization schemes: small frozen dataclasses that say what to quantize and how.

- :class:`Int8Static` -- int8 weights and activations; activation ranges from calibration.
- :class:`Int8Dynamic` -- int8 weights; activation ranges computed at run time per batch
  (the book chapter's TFLite "dynamic range" quantization).
- :class:`WeightOnly` -- int8/int4 weights dequantized on the fly; float activations.

Every scheme validates itself when built (raising :class:`~tvmq.errors.TvmqError`) and is
hashable, so it can key caches and be recorded in ``model.json`` via :meth:`to_dict`.
:func:`get_scheme` turns the CLI's names (``int8``, ``int8-dynamic``, ``w8``, ``w4``) into
schemes.

``skip`` entries name operators (``"relax.nn.conv2d"``) or layers, matched exactly or as
``fnmatch`` patterns (``"classifier.*"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from tvmq.core.observers import normalize_observer_name, observer_names
from tvmq.core.selectors import check_site_selector
from tvmq.errors import TvmqError

__all__ = [
    "Int8Dynamic",
    "Int8Static",
    "Scheme",
    "WeightOnly",
    "get_scheme",
    "list_schemes",
]

ACTIVATION_DTYPES = ("int8", "uint8")
REQUANTIZE_MODES = ("float", "integer")
WEIGHT_BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)


def _check_bool(obj: Any, field: str) -> None:
    value = getattr(obj, field)
    if not isinstance(value, bool):
        raise TvmqError(f"{type(obj).__name__}.{field} must be True or False, got {value!r}")


def _normalize_skip(obj: Any) -> None:
    """Store ``skip`` as a tuple of strings (a single string becomes a 1-tuple)."""
    skip = obj.skip
    if isinstance(skip, str):
        skip = (skip,)
    try:
        skip = tuple(skip)
    except TypeError:
        raise TvmqError(
            f"{type(obj).__name__}.skip must be a tuple of operator or layer names, got {skip!r}"
        ) from None
    bad = [s for s in skip if not isinstance(s, str) or not s]
    if bad:
        raise TvmqError(
            f"{type(obj).__name__}.skip must hold non-empty names (like 'relax.nn.conv2d' or a "
            f"layer name), got {bad!r}"
        )
    object.__setattr__(obj, "skip", skip)


def _matches(patterns: tuple[str, ...], names: tuple[str | None, ...]) -> bool:
    return any(n is not None and fnmatchcase(n, p) for p in patterns for n in names)


class _SchemeMixin:
    """Shared helpers of all schemes."""

    skip: tuple[str, ...]

    def is_skipped(self, *names: str | None) -> bool:
        """Whether any of ``names`` (an operator name, a layer name...) matches ``skip``."""
        return _matches(self.skip, names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, with ``"scheme"`` naming the class."""
        out: dict[str, Any] = {"scheme": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "overrides":
                value = [[name, o.to_dict()] for name, o in value]
            elif f.name == "smooth":
                value = [list(pair) for pair in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Int8Static(_SchemeMixin):
    """Static int8 quantization: weights and activations int8, activation ranges calibrated.

    Parameters
    ----------
    activation_dtype : {"int8", "uint8"}
        uint8 suits x86 VNNI (u8 x s8 dot products).
    activation_symmetric : bool
        Symmetric activation ranges (zero point 0, or 128 for uint8).
    weight_per_channel : bool
        One scale per output channel (else one per tensor).
    weight_symmetric : bool
        Must be True: weights are symmetric int8 in [-127, 127].
    observer : str
        Calibration observer name (see ``tvmq.calibration.list_observers``). ``"auto"``
        calibrates with minmax, percentile, entropy and mse at once and keeps the one whose
        quantized model has the best output SQNR on the first calibration batch (one host
        build per candidate; ``tvmq.quantization.auto_observer``).
    matmul_act_observer : str or None
        Observer of the operands of activation x activation matmuls (``matmul_act`` sites:
        attention's ``Q @ K^T`` and ``P @ V``) that no override names; None uses
        ``observer``. "mse" by default: quantizing all-MiniLM-L6-v2's attention matmuls with
        min/max ranges dropped the minimum cosine of its embeddings to float from 0.9905
        (attention in float) to 0.9877; with MSE ranges it was 0.9907
        (bench/minilm_int8_accuracy.py).
    requantize : {"float", "integer"}
        Requantize int32 accumulators with a float multiply, or integer-only
        (fixed-point multiplier and shift, as on integer-only hardware).
    skip : tuple of str
        Operators or layers to leave in float.
    overrides : tuple of (str, Int8Static) or mapping
        Per-layer settings: the first pattern (fnmatch) matching a layer name wins.
    num_calibration_batches : int, optional
        Use at most this many calibration batches (all of them when None).
    smooth : tuple of (str, float)
        SmoothQuant (``tvmq.passes.SmoothQuant``) before calibration: (site selector, alpha)
        pairs, the first matching pair wins. A site selector is a ``skip`` entry (name,
        pattern, op kind) or ``after:<op>`` (the matmuls whose input that op produces).
        Default ``(("after:layer_norm", 0.5),)``: transformers' Q/K/V and FFN-in matmuls;
        nothing on models without LayerNorm.
    dynamic : tuple of str
        Site selectors of matmuls quantized with run-time per-row activation ranges
        (``QuantizeDynamic``) instead of calibrated ones. Default ``("after:gelu",)``:
        transformers' FFN-out, whose GELU output has token-dependent outliers.
        On all-MiniLM-L6-v2 (seq 128, held-out calibration) the two defaults raise the minimum
        embedding cosine to float from 0.973 to 0.995 at equal latency
        (bench/minilm_static_sweep.py).
    """

    activation_dtype: str = "int8"
    activation_symmetric: bool = False
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    observer: str = "minmax"
    matmul_act_observer: str | None = "mse"
    requantize: str = "float"
    skip: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Int8Static], ...] = ()
    num_calibration_batches: int | None = None
    smooth: tuple[tuple[str, float], ...] = (("after:layer_norm", 0.5),)
    dynamic: tuple[str, ...] = ("after:gelu",)

    def __post_init__(self) -> None:
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise TvmqError(
                f"Int8Static.activation_dtype must be one of {ACTIVATION_DTYPES}, "
                f"got {self.activation_dtype!r}"
            )
        for field in ("activation_symmetric", "weight_per_channel", "weight_symmetric"):
            _check_bool(self, field)
        if not self.weight_symmetric:
            raise TvmqError(
                "Int8Static.weight_symmetric=False is not supported: weights are quantized "
                "symmetrically (zero point 0) so integer kernels need no weight zero-point terms"
            )
        self._check_observer()
        if self.requantize not in REQUANTIZE_MODES:
            raise TvmqError(
                f"Int8Static.requantize must be one of {REQUANTIZE_MODES}, got {self.requantize!r}"
            )
        _normalize_skip(self)
        self._normalize_overrides()
        self._normalize_smooth_dynamic()
        n = self.num_calibration_batches
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise TvmqError(
                f"Int8Static.num_calibration_batches must be a positive integer or None, got {n!r}"
            )

    def _check_observer(self) -> None:
        for field in ("observer", "matmul_act_observer"):
            value = getattr(self, field)
            if value is None and field == "matmul_act_observer":
                continue
            if not isinstance(value, str):
                raise TvmqError(
                    f"Int8Static.{field} must be an observer name, got {type(value).__name__}"
                )
            normalized = normalize_observer_name(value)
            if normalized not in observer_names():
                raise TvmqError(
                    f"Int8Static.{field} {value!r} is unknown; known observers: "
                    f"{', '.join(observer_names())}"
                )
            object.__setattr__(self, field, normalized)

    def observer_for(self, name: str, kind: str | None = None) -> str:
        """The observer of tensor ``name``: a matching override's, else ``matmul_act_observer``
        for the operands of a ``matmul_act`` site (when set), else ``observer``."""
        layer = self.for_layer(name)
        if layer is self and kind == "matmul_act" and self.matmul_act_observer is not None:
            return self.matmul_act_observer
        return layer.observer

    def _normalize_smooth_dynamic(self) -> None:
        dynamic = (self.dynamic,) if isinstance(self.dynamic, str) else self.dynamic
        try:
            dynamic = tuple(dynamic)
        except TypeError:
            raise TvmqError(
                f"Int8Static.dynamic must be a tuple of site selectors, got {self.dynamic!r}"
            ) from None
        for sel in dynamic:
            check_site_selector(sel, "Int8Static.dynamic selector")
        object.__setattr__(self, "dynamic", dynamic)
        raw = self.smooth
        if isinstance(raw, Mapping):
            raw = tuple(raw.items())
        try:
            pairs = tuple(tuple(p) for p in raw)
        except TypeError:
            pairs = None
        if pairs is None or any(len(p) != 2 for p in pairs):
            raise TvmqError(
                "Int8Static.smooth must be a tuple of (site selector, alpha) pairs, "
                f"e.g. (('after:layer_norm', 0.5),), got {self.smooth!r}"
            )
        out = []
        for sel, alpha in pairs:
            check_site_selector(sel, "Int8Static.smooth selector")
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
                raise TvmqError(
                    f"Int8Static.smooth alpha must be a number in [0, 1], got {alpha!r} for {sel!r}"
                )
            out.append((sel, float(alpha)))
        object.__setattr__(self, "smooth", tuple(out))

    def _normalize_overrides(self) -> None:
        raw = self.overrides
        items = list(raw.items()) if isinstance(raw, Mapping) else raw
        try:
            items = [tuple(item) for item in items]
        except TypeError:
            raise TvmqError(
                "Int8Static.overrides must be a mapping or a tuple of (layer name, Int8Static) "
                f"pairs, got {raw!r}"
            ) from None
        for item in items:
            if (
                len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], Int8Static)
            ):
                raise TvmqError(
                    "Int8Static.overrides entries must be (layer name, Int8Static) pairs, "
                    f"got {item!r}"
                )
            if item[1].overrides:
                raise TvmqError(
                    f"the override for {item[0]!r} has overrides of its own; they cannot be nested"
                )
        object.__setattr__(self, "overrides", tuple(items))

    def for_layer(self, name: str | None) -> Int8Static:
        """The settings for layer ``name``: the first matching override, else this scheme."""
        if name is not None:
            for pattern, override in self.overrides:
                if fnmatchcase(name, pattern):
                    return override
        return self


@dataclass(frozen=True)
class Int8Dynamic(_SchemeMixin):
    """Dynamic int8 quantization: int8 weights, activation ranges computed at run time.

    Parameters
    ----------
    weight_per_channel : bool
        One scale per output channel (else one per tensor).
    activation_per_row : bool
        One activation range per row of the matmul input (per token in a transformer), else
        one per tensor (ONNX Runtime's and PyTorch's dynamic quantization). Per row keeps a
        token with outlying values from coarsening every other token's scale: on
        all-MiniLM-L6-v2 (31 sentences, sequence 128) the minimum embedding cosine to float
        went from 0.968 per tensor to 0.993 per row (mean 0.9927 -> 0.9987).
    skip : tuple of str
        Operators or layers to leave in float.
    """

    weight_per_channel: bool = True
    activation_per_row: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bool(self, "weight_per_channel")
        _check_bool(self, "activation_per_row")
        _normalize_skip(self)


@dataclass(frozen=True)
class WeightOnly(_SchemeMixin):
    """Weight-only quantization: int8/int4 weights dequantized on the fly, float activations.

    Parameters
    ----------
    bits : {8, 4}
        Weight bits.
    group_size : {None, 32, 64, 128}
        Scales per group of this many input elements; None for one scale per output channel.
    symmetric : bool
        Symmetric weights (zero point 0); else asymmetric with a zero point per group.
    skip : tuple of str
        Operators or layers to leave in float.
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, int)
            or self.bits not in WEIGHT_BITS
        ):
            raise TvmqError(f"WeightOnly.bits must be one of {WEIGHT_BITS}, got {self.bits!r}")
        g = self.group_size
        if g is not None and (
            isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES
        ):
            raise TvmqError(
                f"WeightOnly.group_size must be None (per channel) or one of {GROUP_SIZES}, got {g!r}"
            )
        _check_bool(self, "symmetric")
        _normalize_skip(self)

    @property
    def weight_dtype(self) -> str:
        """``"int8"`` or ``"int4"``."""
        return f"int{self.bits}"


Scheme = Int8Static | Int8Dynamic | WeightOnly

_NAMED: dict[str, Scheme] = {
    "int8": Int8Static(),
    "int8-dynamic": Int8Dynamic(),
    "w8": WeightOnly(bits=8),
    "w4": WeightOnly(bits=4, group_size=32),
}


def list_schemes() -> list[str]:
    """Names :func:`get_scheme` accepts."""
    return list(_NAMED)


def get_scheme(spec: str | Scheme) -> Scheme:
    """Return the scheme named ``spec`` (``int8``, ``int8-dynamic``, ``w8``, ``w4``), or ``spec``.

    Parameters
    ----------
    spec : str or scheme
        A name (case-insensitive; ``_`` works for ``-``) or a scheme object, returned as is.

    Returns
    -------
    Int8Static, Int8Dynamic or WeightOnly
    """
    if isinstance(spec, Int8Static | Int8Dynamic | WeightOnly):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("_", "-")
        if key in _NAMED:
            return _NAMED[key]
        raise TvmqError(f"unknown quantization scheme {spec!r}; known schemes: {', '.join(_NAMED)}")
    raise TvmqError(
        f"a quantization scheme must be a name ({', '.join(_NAMED)}) or an Int8Static, "
        f"Int8Dynamic or WeightOnly object, not {type(spec).__name__}"
    )
