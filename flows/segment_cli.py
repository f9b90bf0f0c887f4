"""The command line of ``python flows/segment.py``: arguments, checks before anything starts, one
``error:`` line per failure and the pipeline's exit codes (:mod:`flows.command`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from flows.command import EXIT_USAGE, POSITIVE_INT, POSITIVE_FLOAT, _DefaultsHelp, _number, _Parser, run_command
from flows.segment import FORMATS, default_output, segment_volume
from flows.temporary_server import running_on, start_temporary_server
from unet.backends import BACKENDS, PRECISIONS, check_precision
from unet.blocks import DEFAULT_BLOCK
from unet.tta import LEVELS


def _multiple_of_16(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` and a multiple of 16 (the network's pooling grid)."""
    what = f"a multiple of 16, at least {low}"
    number = _number(int, low, what)

    def parse(text: str) -> int:
        value = number(text)
        if value % 16:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


SIDE = _multiple_of_16(64)
HALO = _multiple_of_16(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python flows/segment.py",
        description="Segment a volume with a trained UNet, block by block: cell probabilities, mask and cell "
                    "instances as OME-Zarr (napari, Fiji) or TIFF. A rerun continues an interrupted run and "
                    "skips a finished one.",
        epilog="Examples: python flows/segment.py stack.tif; python flows/segment.py frames/ --format tiff "
               "--output out/; python flows/segment.py big.ome.zarr --workers 2. Exit codes: 0 done, 1 failed "
               "(bad input, missing model, disk full), 2 invalid arguments, 130 interrupted, 143 terminated.",
        formatter_class=_DefaultsHelp)
    p.add_argument("input", metavar="INPUT",
                   help="a TIFF stack (grey; uint8, uint16 or float), a folder of PNG/TIFF frames (sorted by name), "
                        "or a Zarr / OME-Zarr array ([z,] y, x)")
    p.add_argument("--output", "-o", help="where the result goes (default: <work-dir>/segmentations/<input "
                                          "name>.ome.zarr, or <input name>/ with --format tiff)")
    p.add_argument("--format", default="zarr", choices=FORMATS,
                   help="zarr: one OME-Zarr (probability image, labels mask and cells); tiff: probabilities.tif, "
                        "masks.tif, cells.tif in a folder")
    p.add_argument("--work-dir", default="artifacts", help="the pipeline's work directory (where the champion is)")
    p.add_argument("--model", default="champion",
                   help="'champion' (the work directory's), a train stage folder (<work-dir>/train/<key>) or a "
                        "checkpoint in one, or an export folder of flows/export.py (ONNX Runtime only)")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS),
                   help="onnxruntime: the model's weights as an ONNX graph (about 3.8x faster on this CPU, agrees "
                        "with MindSpore to about 1e-6); mindspore: the training framework")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="fp32; int8: the model's export quantized to 8 bits (ONNX Runtime; calibrated on its "
                        "training frames by flows/export.py, which the pipeline runs for its champion), about 2.6x "
                        "faster; auto: int8 where the export's check on the val frames found it loses less than "
                        "0.002 of cell IoU, membrane Dice and V_rand, else fp32")
    p.add_argument("--tta", choices=list(LEVELS),
                   help="test-time augmentation: none, flips (4 views), d4 (8 flips/rotations) or d4-flips (d4 at "
                        "scale 1, flips at the other --tta-scales: 16 passes instead of 24 for fullres, the same val "
                        "scores within 0.002) (default: the model's recipe: d4-flips for fullres, whose recipe says "
                        "d4 at three scales; none for seed/smoke)")
    p.add_argument("--tta-scales", type=POSITIVE_FLOAT, nargs="+", metavar="SCALE",
                   help="average the predictions of the volume resized by each SCALE (default: the scales the "
                        "model was evaluated with)")
    p.add_argument("--block", type=SIDE, default=DEFAULT_BLOCK,
                   help="side of a block's core in pixels (native-resolution models; resize models predict whole "
                        "sections)")
    p.add_argument("--halo", type=HALO,
                   help="pixels of context around each block (default: the network's receptive field, which makes "
                        "the result equal whole-frame inference; smaller is faster and approximate)")
    p.add_argument("--workers", type=POSITIVE_INT, default=1,
                   help="a local Dask cluster of this many single-threaded worker processes (1: no Dask; with "
                        "--dask-address the cluster's own workers are used and counted)")
    p.add_argument("--dask-address", metavar="ADDR",
                   help="an existing Dask scheduler, e.g. tcp://host:8786 (docs/scale-out.md)")
    p.add_argument("--blocks-per-task", type=POSITIVE_INT,
                   help="blocks per Prefect task (default: about 4 tasks per worker of the local or remote "
                        "cluster, at most 16 blocks each)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output that holds another input's, model's or settings' segmentation")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def check(args: argparse.Namespace) -> dict:
    """Before the server starts: the input opens, the model resolves, the output can be written."""
    from tasks.segment import resolve_model
    from unet.volume_io import open_volume

    open_volume(args.input)
    check_precision(args.precision, args.backend, auto=True)
    model = resolve_model(args.model, args.work_dir, args.precision, args.backend)
    out = Path(args.output or default_output(args.input, args.work_dir, args.format)).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output exists and is a file; expected a folder (or a new path)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: not writable (output {out})")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    params = {k: v for k, v in vars(args).items() if k != "debug"}

    def run_segmentation() -> dict:
        with running_on(start_temporary_server()):  # Dask's workers report to it too
            return segment_volume(**params)

    # MindSpore, where needed, is imported by the blocks' tasks (flows.command defers a stop signal
    # that lands in that import)
    code, summary = run_command(args.debug, lambda: check(args), run_segmentation,
                                "finished blocks are kept and the same command continues from them")
    if code == 0:
        print(format_summary(summary))
    return code


def format_summary(summary: dict) -> str:
    z, h, w = summary["shape"]
    cells = summary["cells"]
    lines = [f"segmentation  {summary['output']}",
             f"volume        {z} sections of {h} x {w}, {summary['blocks']} blocks, {summary['seconds']} s "
             f"({summary['sections_per_s']} sections/s)",
             f"cells         {cells['total']} ({cells['per_section_mean']} per section)",
             f"inference     {summary['backend']} {summary['precision']} ({summary.get('precision_reason', 'asked for')}), "
             f"TTA {summary['settings']['tta']}, scales {summary['settings']['scales']}",
             f"preview       {summary['files']['preview']}"]
    if summary["format"] == "zarr":
        lines.append(f"open with     napari --plugin napari-ome-zarr {summary['output']}")
    else:
        lines += [f"{k:<13} {v}" for k, v in summary["files"].items() if k != "preview"]
    return "\n".join(lines)


def run() -> int:
    code = main()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as flows.cli.run: let the server stop
    return code


if __name__ == "__main__":
    sys.exit(run())
