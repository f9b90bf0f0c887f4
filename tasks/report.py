"""The run's summary.json, the Prefect artifacts a user reads in the UI, and the console summary.

Artifacts are made from stage results in the flow body, so a cached rerun shows them too."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from unet.align import Alignment
from unet.export import INT8_FILE

CASE_PUBLISHED = {  # the MindSpore case's table (cell class, per-image means at 224x224)
    "train": {"acc": 0.90, "iou": 0.88, "dice": 0.94, "sens": 0.94, "spec": 0.76},
    "val": {"acc": 0.92, "iou": 0.90, "dice": 0.95, "sens": 0.96, "spec": 0.77},
}
FIVE = ("acc", "iou", "dice", "sens", "spec")
EXTRA = ("membrane_iou", "membrane_dice", "balanced_accuracy", "v_rand", "v_info", "v_rand_filled",
         "v_info_filled")


def _abs(result: dict, name: str) -> str:
    return str(Path(result["output"]) / result[name])


def build_summary(run_name: str, parameters: dict, stages: dict[str, tuple[str, float, dict]],
                  decision: dict) -> dict:
    """The summary.json document: per-stage state, seconds and folder; metrics of the model this
    run trained; the champion decision; output paths (test predictions come from the champion)."""
    model, evaluation = stages["train"][2], stages["evaluate"][2]
    prediction = stages["predict"][2] if "predict" in stages else None  # None: no test volume
    champion = decision["champion"]
    return {
        "run": run_name,
        "parameters": parameters,
        "stages": {name: {"state": state, "seconds": round(seconds, 2), "output": result["output"]}
                   for name, (state, seconds, result) in stages.items()},
        "metrics": evaluation["metrics"],
        "best_epoch": model["best_epoch"],
        # (dy, dx) the training labels were shifted by (register_labels); models trained before it: none
        "label_shift": model.get("label_shift"),
        # score: the promotion rule's (tasks.promote.champion_score); the val IoUs for reading
        "champion": {"decision": decision["decision"], "new_score": decision["new_score"],
                     "previous_score": decision["champion_score"], "new_val_iou": decision["new_val_iou"],
                     "previous_val_iou": decision["champion_val_iou"],
                     "checkpoint": _abs(champion["model"], "best_checkpoint"), "run": champion.get("run")},
        "outputs": {
            "checkpoint": _abs(model, "best_checkpoint"),
            "history": _abs(model, "history"),
            "metrics": _abs(evaluation, "metrics_json"),
            "val_predictions": _abs(evaluation, "val_predictions"),
            "val_probabilities": _abs(evaluation, "val_probabilities"),
            "history_plot": _abs(evaluation, "history_png"),
            "val_examples": _abs(evaluation, "examples_png"),
            **({} if prediction is None else {
                "test_masks": _abs(prediction, "test_masks"),
                "test_probabilities": _abs(prediction, "test_probabilities"),
                "test_overlays": _abs(prediction, "test_overlays"),
                # results stored before the figure existed have no entry for it
                "test_examples": _abs(prediction, "test_examples_png") if "test_examples_png" in prediction else None,
            }),
        },
    }


def write_summary(work_dir: str, summary: dict) -> Path:
    """<work_dir>/runs/<run>/summary.json, and runs/latest pointing at that run (replaced atomically)."""
    runs = Path(work_dir).resolve() / "runs"
    folder = runs / summary["run"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    link = runs / f".latest-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(summary["run"])
    os.replace(link, runs / "latest")
    return path


def metrics_rows(metrics: dict) -> list[dict]:
    """Rows of our metrics beside the case's published ones (the unet-metrics table)."""
    rows = []
    for name, label in (("train", "train (ours, training eval)"), ("val", "val (ours, training eval)"),
                        ("train_native", "train (ours, native size)"), ("val_native", "val (ours, native size)"),
                        ("val_native_unaligned", "val (ours, native unaligned)")):
        if name not in metrics:  # train_native, *_unaligned: evaluations made before they existed
            continue
        if name == "val_native_unaligned" and Alignment.from_dict(metrics.get("alignment")).is_zero:
            continue  # nothing was moved: the same row as val_native
        m = metrics[name]
        rows.append({"set": label, **{k: round(m[k], 4) for k in FIVE},
                     **{k: round(m[k], 4) if k in m else "" for k in EXTRA}})
    for name in ("train", "val"):
        rows.append({"set": f"{name} (case, published)", **CASE_PUBLISHED[name], **{k: "" for k in EXTRA}})
    return rows


def publish_artifacts(summary: dict) -> None:
    """The unet-metrics and unet-training-history tables and the unet-report markdown."""
    create_table_artifact(metrics_rows(summary["metrics"]), key="unet-metrics",
                          description="Cell-class metrics (the case's five) and membrane / ISBI scores")
    history = pd.read_csv(summary["outputs"]["history"]).round(4)
    create_table_artifact(history.to_dict("records"), key="unet-training-history",
                          description="Per-epoch loss, train and val metrics, seconds")
    create_markdown_artifact(report_markdown(summary), key="unet-report", description="UNet pipeline run report")


def alignment_text(metrics: dict) -> str | None:
    """One line on the alignment shift the val (and test) predictions got, or None when none was
    estimated (``--no-align``, or evaluations made before it existed)."""
    a = metrics.get("alignment")
    if not a or not a.get("applied"):
        return None
    return (f"predictions shifted by dy {a['dy']:+.2f} dx {a['dx']:+.2f} px, estimated on the train frames "
            f"(mean squared error {a['mse_before']:.4f} -> {a['mse_after']:.4f}; unet/align.py)")


def scales_text(metrics: dict) -> str | None:
    """One line on the test-time scales of the native-size predictions, or None for the frame as
    it is (1.0 alone, or evaluations made before scales existed)."""
    scales = metrics.get("tta_scales") or [1.0]
    if list(scales) == [1.0]:
        return None
    return (f"native-size predictions averaged over the frame resized by {', '.join(f'{s:g}' for s in scales)} "
            "(unet.infer.predict_frame)")


def label_shift_text(summary: dict) -> str | None:
    """One line on the shift the training labels got (recipe ``register_labels``), or None."""
    shift = summary.get("label_shift")
    if not shift or not any(shift):
        return None
    return (f"training labels shifted by dy {shift[0]:+.2f} dx {shift[1]:+.2f} px onto their images' membranes "
            "(estimated on the train frames; unet.data.label_offset)")


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(summary: dict) -> str:
    p = summary["parameters"]
    stages = [{"stage": k, "state": v["state"], "seconds": v["seconds"], "output": f"`{v['output']}`"}
              for k, v in summary["stages"].items()]
    outputs = [{"output": k, "path": f"`{v}`"} for k, v in summary["outputs"].items()]
    return "\n\n".join([
        f"# UNet on ISBI 2012 — run `{summary['run']}`",
        f"**Data** `{p['data_dir']}` · **recipe** `{p['preset']}` · **work dir** `{p['work_dir']}` · "
        f"**best epoch** {summary['best_epoch']} · **champion** {summary['champion']['decision']} "
        f"(test predictions from `{summary['champion']['checkpoint']}`)",
        "## Metrics\nCell class = the case's positive class (78 % of pixels); the membrane columns "
        "score the minority class, V_rand / V_info are the ISBI 2012 segmentation scores of the "
        "connected components of the thresholded cell map; the *_filled columns score the same components "
        "grown over the membrane pixels (post-processing).",
        _table(metrics_rows(summary["metrics"])),
        *([f"**Alignment** {text}"] if (text := alignment_text(summary["metrics"])) else []),
        *([f"**Test-time scales** {text}"] if (text := scales_text(summary["metrics"])) else []),
        *([f"**Registered labels** {text}"] if (text := label_shift_text(summary)) else []),
        "## Recipe\n```json\n" + json.dumps(p.get("recipe", {}), indent=2) + "\n```",
        "## Stages", _table(stages),
        "## Outputs", _table(outputs),
    ])


def format_console(summary: dict) -> str:
    """A short human summary for the end of the run."""
    lines = [f"\nRun {summary['run']}: stages " +
             ", ".join(f"{k} {v['state']} ({v['seconds']:.1f} s)" for k, v in summary["stages"].items()),
             f"{'':28}" + "".join(f"{k:>10}" for k in FIVE + ("mem_dice", "v_rand", "v_rand_f"))]
    for row in metrics_rows(summary["metrics"]):
        vals = [row[k] for k in FIVE] + [row["membrane_dice"], row["v_rand"], row["v_rand_filled"]]
        lines.append(f"{row['set']:28}" + "".join(f"{v:>10.4f}" if v != "" else f"{'':>10}" for v in vals))
    out = summary["outputs"]
    champ = summary["champion"]
    if text := alignment_text(summary["metrics"]):
        lines.append(f"alignment         {text}")
    if text := scales_text(summary["metrics"]):
        lines.append(f"test-time scales  {text}")
    if text := label_shift_text(summary):
        lines.append(f"registered labels {text}")
    lines += [f"checkpoint        {out['checkpoint']}",
              f"champion          {champ['decision']}: {champ['checkpoint']}",
              *([f"test masks        {out['test_masks']}", f"test probability  {out['test_probabilities']}"]
                if "test_masks" in out else ["test              no test volume: predict_test skipped"]),
              f"val examples      {out['val_examples']}"]
    if out.get("test_examples"):
        lines.append(f"test examples     {out['test_examples']}")
    if out.get("champion_export"):
        int8 = (Path(out["champion_export"]) / INT8_FILE).is_file()
        lines.append(f"champion export   {out['champion_export']} (ONNX{' fp32 and int8' if int8 else ''}, MindIR, "
                     f"model.json)")
    lines.append("segment new data  make segment ARGS=\"path/to/stack.tif\" (python flows/segment.py --help)")
    return "\n".join(lines)
