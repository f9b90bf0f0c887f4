"""Export a trained model for serving: ``python flows/export.py --out DIR [--work-dir W] [--model M]``.

Writes ``DIR/model.onnx``, ``DIR/model.int8.onnx`` (calibrated on the model's training frames and
checked on its val frames), ``DIR/model.mindir`` and ``DIR/model.json`` (tasks/export.py); then
``python flows/segment.py INPUT --model DIR`` segments with ONNX Runtime alone. No Prefect server
is started: exporting is one short step.
"""
from __future__ import annotations

import argparse
import sys

from flows.command import EXIT_FAILED, EXIT_USAGE, _DefaultsHelp, _Parser, describe


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python flows/export.py", formatter_class=_DefaultsHelp,
                description="Export a trained UNet (the champion or a train stage folder) as ONNX + MindIR with a "
                            "model.json that says how to run it.")
    p.add_argument("--out", required=True, help="the folder to write model.onnx, model.mindir, model.json into")
    p.add_argument("--work-dir", default="artifacts", help="the pipeline's work directory (where the champion is)")
    p.add_argument("--model", default="champion", help="'champion', or a train stage folder or a checkpoint in one")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    from tasks.export import export_model, int8_summary

    try:
        record = export_model(args.model, args.work_dir, args.out)
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {describe(exc)}", file=sys.stderr)
        return EXIT_FAILED
    val = ", ".join(f"{k} {v:.4f}" for k, v in record["val"].items()) or "no evaluation found"
    print(f"exported {record['source']} ({record['recipe']['name']}, key {record['model_key']}) to {args.out}\n"
          f"  model.onnx, model.mindir, model.json; val: {val}\n"
          f"  int8: {int8_summary(record)}\n"
          f"  segment with it: python flows/segment.py INPUT --model {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
