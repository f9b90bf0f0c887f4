"""Champion model: a newly trained model replaces the current one only if it scores at least as
well on the same validation frames. Test predictions come from the champion.

The score is the mean of the three numbers a segmentation is judged by here (docs/results.md): val
cell IoU, membrane Dice and V_rand (the best threshold's), each at native size. Cell IoU alone once
promoted a model 0.001 better in IoU and 0.04 worse in V_rand.

The champion lives in ``<work_dir>/champion.json`` (replaced atomically, under a lock): the train
stage result of the model and its recipe. Both models are scored by the evaluate stage on the
current val split, so a retrain on new data compares like with like.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.report import _table
from tasks.stage import _locked, outputs_exist

# val scores at native size, comparable across recipes: cell IoU (per-image mean), membrane Dice, V_rand
SCORE_KEYS = ("iou", "membrane_dice", "v_rand")


def champion_score(evaluation: dict) -> tuple[float, dict[str, float]]:
    """The promotion score of an evaluate stage result (the mean of SCORE_KEYS of its val_native
    metrics) and the numbers behind it."""
    native = evaluation["metrics"]["val_native"]
    parts = {k: float(native[k]) for k in SCORE_KEYS}
    return sum(parts.values()) / len(parts), parts


def champion_path(work_dir: str) -> Path:
    return Path(work_dir) / "champion.json"


@task(name="read_champion", cache_policy=NO_CACHE)
def read_champion(work_dir: str) -> dict | None:
    """The current champion ({"model", "recipe", ...}), or None when there is none or its
    checkpoint folder no longer exists."""
    path = champion_path(work_dir)
    if not path.is_file():
        return None
    champion = json.loads(path.read_text())
    if not outputs_exist(champion["model"]):
        get_run_logger().warning("champion %s is gone from disk; the new model takes its place",
                                 champion["model"]["output"])
        return None
    return champion


@task(name="promote_champion", cache_policy=NO_CACHE)
def promote_champion(work_dir: str, model: dict, recipe: dict, evaluation: dict, champion: dict | None,
                     champion_evaluation: dict | None, run_name: str) -> dict:
    """Decide, record and report: returns {"decision", "champion": {...}, scores}."""
    new_score, new_parts = champion_score(evaluation)
    old_score, old_parts = (None, None) if champion_evaluation is None else champion_score(champion_evaluation)
    same_model = champion is not None and champion["model"]["key"] == model["key"]
    promote = champion is None or same_model or new_score >= old_score
    decision = "unchanged" if same_model else ("promoted" if promote else "kept")
    with _locked(Path(work_dir) / ".locks" / "champion.lock"):
        if promote and not same_model:
            record = {"model": model, "recipe": recipe, "score": new_score, "val_iou": new_parts["iou"],
                      "val_membrane_dice": new_parts["membrane_dice"], "val_v_rand": new_parts["v_rand"],
                      "run": run_name,
                      "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            tmp = champion_path(work_dir).with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, champion_path(work_dir))
            champion = record
    before = ("this model" if same_model else "none") if old_score is None else f"{old_score:.4f}"
    get_run_logger().info("champion: %s (new model score %.4f = mean of val IoU %.4f, membrane Dice %.4f, "
                          "V_rand %.4f; champion %s)", decision, new_score, *new_parts.values(), before)

    def row(name: str, score: float | None, parts: dict | None, output: str) -> dict:
        numbers = {"score": score, **(parts or dict.fromkeys(SCORE_KEYS))}
        return {"model": name, **{k: "—" if v is None else f"{v:.4f}" for k, v in numbers.items()},
                "checkpoint": f"`{output}`"}

    create_markdown_artifact(
        "\n".join([f"# Champion decision: **{decision}**", "",
                   _table([row(f"new ({run_name})", new_score, new_parts, model["output"]),
                           row("champion before", old_score, old_parts,
                               "—" if champion_evaluation is None else champion_evaluation["model_output"])]),
                   "", f"Test predictions use `{champion['model']['output']}`.",
                   "Rule: the new model replaces the champion when its score — the mean of its val IoU, "
                   "membrane Dice and V_rand at native size — is at least the champion's, both scored on "
                   "the current val frames."]),
        key="unet-champion", description="Champion model decision")
    return {"decision": decision, "champion": champion, "new_score": new_score, "champion_score": old_score,
            "new_val_iou": new_parts["iou"], "champion_val_iou": None if old_parts is None else old_parts["iou"]}
