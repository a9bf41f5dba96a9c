"""The options of ``tvmq compile`` (argparse definitions only; the checks are in
``tvmq.cli_options``, the command in ``tvmq.cli_commands``)."""

from __future__ import annotations

import argparse

from tvmq.cli_options import DUMP_KINDS, QUANTIZE_SCHEMES, parse_shape

__all__ = ["add_compile_options"]


def add_input_shape_option(s: argparse.ArgumentParser) -> None:
    """``--input-shape NAME:1x3x224x224`` (compile, tune, inspect)."""
    s.add_argument(
        "--input-shape",
        action="append",
        type=parse_shape,
        metavar="NAME:1x3x224x224",
        help="shape of an input whose dimensions the model leaves dynamic (repeatable): a "
        "number pins a dimension, a name makes it symbolic, e.g. input_ids:Bx128 (one library "
        "for any batch B; the same name in two inputs is one size). Dynamic dimensions not "
        "given stay symbolic",
    )


def add_compile_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "model", help="model file: .onnx, .tflite, .keras, .h5, or .pt2 (torch.export.save)"
    )
    s.add_argument(
        "-t", "--target", default="host", help="target preset name or JSON file (default: host)"
    )
    s.add_argument("-o", "--output", required=True, help="output directory (model.so + model.json)")
    add_input_shape_option(s)
    _compression_options(s.add_argument_group("compression"))
    _quantize_options(s.add_argument_group("quantization"))
    g = s.add_argument_group("build")
    g.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="fp16 (CUDA presets): compute in half precision with fp32 accumulation, dense "
        "layers on tensor cores (mma.sync, sm_80 and newer); bf16: matmuls and convs with "
        "bf16 operands and fp32 accumulation, on tensor cores (CUDA presets, sm_80 and newer) "
        "or AMX tiles (CPUs with AMX-BF16), the rest of the model in fp32",
    )
    g.add_argument(
        "--tuning-logs",
        action="append",
        metavar="DIR",
        help="MetaSchedule record folder to apply (repeatable; default: ./tuning_logs/<target>/ "
        "and the logs shipped with tvmq)",
    )
    g.add_argument(
        "--no-tuning-logs", action="store_true", help="apply no tuning records (default schedules)"
    )
    g.add_argument(
        "--dump",
        nargs=2,
        metavar=("KINDS", "DIR"),
        help=f"also write what was compiled into DIR (created; existing files are never "
        f"replaced): KINDS is a comma-separated list of {', '.join(DUMP_KINDS)}: ir = the "
        "Relax IR after tvmq's passes (model.relax.py), ll = LLVM IR, asm = assembly "
        "(llvm targets)",
    )
    g.add_argument(
        "--report",
        action="store_true",
        help="also write report.html (+ .json, .csv) into the output directory (see tvmq report)",
    )


def _compression_options(g) -> None:
    g.add_argument(
        "--prune",
        type=float,
        metavar="FRACTION",
        help="prune this fraction of weights (or channels, with --prune-kind channel), in (0, 1)",
    )
    g.add_argument(
        "--prune-kind",
        choices=["unstructured", "2:4", "4:8", "channel"],
        default="unstructured",
        help="magnitude pruning of single weights, N:M semi-structured, or whole output channels",
    )
    g.add_argument(
        "--sparse",
        nargs="?",
        const=0.7,
        type=float,
        metavar="MIN_SPARSITY",
        help="run float layers whose weight is at least this block-sparse (default 0.7) on "
        "block-sparse (BSR) kernels; use after --prune",
    )
    g.add_argument(
        "--sparse-block",
        metavar="RxC",
        help="BSR block of the [out, in] weight for --sparse (default 16x1; 1x1 suits "
        "unstructured --prune)",
    )
    g.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="share weights: N values per tensor (k-means; a power of two from 2 to 256), "
        "stored as a codebook and codes, decoded once at load; with --quantize int8, "
        "N <= 16 int8 values per weight (an int8 codebook)",
    )


def _quantize_options(g) -> None:
    g.add_argument(
        "--quantize",
        choices=list(QUANTIZE_SCHEMES),
        help="int8: static int8 weights and activations (needs --calib); int8-dynamic: int8 "
        "weights, activation ranges at run time; w8 / w4: int8 / int4 weights, float compute",
    )
    g.add_argument(
        "--skip",
        action="append",
        metavar="GLOB",
        help="leave matching layers out of --quantize, --prune and --cluster (repeatable): "
        "a layer name such as matmul_3, the model's own name (PyTorch module path "
        "encoder.0.fc, ONNX node name) or an fnmatch pattern of either ('classifier*'); "
        "`tvmq inspect MODEL` lists the layers",
    )
    g.add_argument(
        "--calib", help="calibration data (.npz, keys = input names) for --quantize int8"
    )
    g.add_argument(
        "--observer",
        help="how --quantize int8 picks activation ranges: minmax (default), moving_average, "
        "percentile, entropy, mse, or auto: calibrate once with minmax, percentile, entropy and "
        "mse, build the model with each on the host and keep the one whose outputs are closest "
        "to float (best output SQNR on the first calibration batch); one choice for the whole "
        "model, at the cost of four extra host builds",
    )
    g.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per tensor instead of per output channel (int8, int8-dynamic)",
    )
    g.add_argument(
        "--requantize",
        choices=["float", "integer"],
        help="int8: rescale int32 accumulators with a float multiply (default) or integer-only "
        "(fixed-point multiplier and shift, as integer-only hardware does)",
    )
    smooth = g.add_mutually_exclusive_group()
    smooth.add_argument(
        "--smooth",
        nargs="?",
        const=0.5,
        type=float,
        metavar="ALPHA",
        help="int8: SmoothQuant strength in [0, 1] (default 0.5) on the matmuls after a "
        "LayerNorm, where it is on by default; models without LayerNorm are unaffected",
    )
    smooth.add_argument(
        "--no-smooth", action="store_true", help="int8: no SmoothQuant (on by default)"
    )
    g.add_argument(
        "--bias-correction",
        action="store_true",
        help="int8: add to each layer's bias the mean quantization error of its output on the "
        "calibration data (empirical bias correction)",
    )
    g.add_argument(
        "--accuracy-drop",
        type=float,
        metavar="X",
        help="accuracy control: return the most sensitive layers to float, one at a time, "
        "until top-1 accuracy on --eval drops by at most X percentage points from float",
    )
    g.add_argument(
        "--eval",
        metavar="DATA.npz",
        help="evaluation data for --accuracy-drop: the inputs (keys = input names) plus "
        "'labels' (top-1 accuracy) or arrays named like the outputs (top-1 agreement with "
        "them); with inputs only, top-1 agreement with the float model",
    )
