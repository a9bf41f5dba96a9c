"""The site-selector syntax of ``skip`` lists and of ``Int8Static``'s ``smooth`` / ``dynamic``.

A *site* is one matmul / conv2d with a constant weight, or one weightless integer op, named
``<kind>_<index>`` in dataflow order (``tvmq.passes.sites`` finds them). A weight site also
has the names the source model gave it, where the frontend knew them (``layer names``: the
PyTorch module path ``encoder.0.fc``, the ONNX node name ``/encoder/encoder.0/fc/Gemm``). A
selector names sites by any of those names or an fnmatch pattern of one (``"matmul_3"``,
``"conv2d_*"``, ``"encode/matmul_*"``, ``"classifier*"``), by kind (``"linear"``, ``"conv2d"``, ``"matmul_act"``, see
:func:`is_skipped`), or, in ``smooth`` / ``dynamic``, by what produces the activation
(``"after:gelu"``, resolved on the IR by ``tvmq.passes.sites.selects``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import tvm

from tvmq.errors import TvmqError

# Names that select every site of a kind in a skip list, besides the site's own name.
_KIND_NAMES = {
    "matmul": ("relax.matmul", "matmul", "dense", "linear"),
    "conv2d": ("relax.nn.conv2d", "conv2d"),
    "add": ("relax.add", "add"),
    "concat": ("relax.concat", "concat", "cat"),
    "matmul_act": ("relax.matmul", "matmul_act"),
}


def is_skipped(name: str, kind: str, skip, layer_names=()) -> bool:
    """Whether a skip list (fnmatch patterns of site names or op names) selects a site.

    ``"conv2d"`` / ``"relax.nn.conv2d"`` select every conv2d; ``"matmul"``, ``"dense"``,
    ``"linear"`` every matmul with a constant weight; ``"matmul_act"`` every matmul of two
    activations (attention); ``"relax.matmul"`` both; ``"add"`` / ``"concat"`` every integer
    add / concat; ``"matmul_3"`` or ``"conv2d_*"`` by name; ``"classifier*"`` by one of the
    site's `layer_names` (its names in the source model).
    """
    names = (name, *layer_names, *_KIND_NAMES[kind])
    return any(fnmatchcase(n, str(p)) for p in (skip or ()) for n in names)


#: The op kinds a skip list may name (each stands for all its aliases in ``_KIND_NAMES``).
KIND_NAMES = ("linear", "conv2d", "matmul_act", "add", "concat")


def is_kind_name(pattern: str) -> bool:
    """Whether `pattern` is an op-kind name of :func:`is_skipped` (``"linear"``, ``"conv2d"``)."""
    return any(pattern in names for names in _KIND_NAMES.values())


#: Selector prefix for the sites whose activation input an op produces: ``after:gelu``.
AFTER = "after:"


def resolve_op(short: str) -> str | None:
    """The registered Relax op ``short`` names (``gelu``, ``nn.gelu``, ``relax.nn.gelu``)."""
    for name in (short, f"relax.{short}", f"relax.nn.{short}"):
        if not name.startswith("relax."):
            continue
        try:
            tvm.ir.Op.get(name)
        except Exception:  # 0.27 raises AttributeError for an unregistered op
            continue
        return name
    return None


def check_site_selector(selector, what: str = "site selector") -> str:
    """Return `selector` when it is a valid site selector, else raise one ``TvmqError``.

    A selector is what a skip list holds (a site name, an fnmatch pattern of site names, an
    op kind: see :func:`is_skipped`) or ``after:<op>``: the matmul / conv2d sites whose
    activation input ``<op>`` produces (``after:layer_norm``, ``after:gelu``; seen through
    ``reshape`` / ``permute_dims``). Any other ``<prefix>:`` form is an error.
    """
    if not isinstance(selector, str) or not selector.strip():
        raise TvmqError(f"{what} must be a non-empty string, got {selector!r}")
    if selector.startswith(AFTER):
        op = selector[len(AFTER) :]
        if resolve_op(op) is None:
            raise TvmqError(
                f"{what} {selector!r}: {op!r} is not a Relax op (write e.g. 'after:gelu', "
                "'after:layer_norm' or 'after:relax.nn.gelu')"
            )
        return selector
    if ":" in selector:
        raise TvmqError(
            f"{what} {selector!r} has an unknown form: use a site name or fnmatch pattern "
            "('matmul_3', 'conv2d_*'), an op kind ('matmul', 'conv2d', 'matmul_act') or "
            "'after:<op>' ('after:gelu')"
        )
    return selector
