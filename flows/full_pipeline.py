"""The main job: labelled EM volumes -> trained, evaluated UNet and test-set prediction.

    extract_frames -> split_dataset -> build_datasets -> train_unet -> evaluate -> (champion, export) -> predict_test

The data come one of three ways (:mod:`unet.data_list`): an ISBI 2012 folder (``data_dir``), a
volume and its labels (``train_volume``, ``train_labels``, ``labels_kind``) or a data list of such
pairs (``data_list``); without a test volume, predict_test is skipped.

Every stage is cached by the content of its inputs, its parameters and its code: a rerun with
nothing changed reports every stage Cached and takes seconds. Run ``python flows/full_pipeline.py
--help`` for the options; the command line is :mod:`flows.cli`, this module only the flow.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    from flows.sigint import forward_sigint

    forward_sigint()  # before any thread starts: a Ctrl-C stays SIGINT under MindSpore (flows/sigint.py)
    from flows.cli import run

    # the command line (flows/cli.py) checks the arguments and the paths, launches Prefect's
    # temporary server, and imports this module's flow while the server starts
    sys.exit(run())

from flows.command import prefect_defaults  # noqa: E402

prefect_defaults()

from prefect import flow, get_run_logger, runtime  # noqa: E402

from flows.parameters import extract_parameters, resolve_recipe, resolve_scales  # noqa: E402
from tasks.datasets import build_datasets  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.export import export_champion  # noqa: E402
from tasks.extract import extract_frames  # noqa: E402
from tasks.predict import predict_test  # noqa: E402
from tasks.promote import promote_champion, read_champion  # noqa: E402
from tasks.report import build_summary, publish_artifacts, write_summary  # noqa: E402
from tasks.split import split_dataset  # noqa: E402
from tasks.stage import call_stage  # noqa: E402
from tasks.train import train_unet  # noqa: E402
from unet.data_list import DEFAULT_DATA_DIR, resolve_inputs  # noqa: E402
from unet.labels import DEFAULT_MEMBRANE_WIDTH  # noqa: E402

SEGMENT_HINT = "segment new data with the champion: python flows/segment.py VOLUME (README: Segment your own volume)"


@flow(name="full-pipeline")
def full_pipeline(data_dir: str | None = None, work_dir: str = "artifacts", preset: str = "seed",
                  epochs: int | None = None, batch_size: int | None = None, base_channels: int | None = None,
                  learning_rate: float | None = None, tta: bool | None = None, seed: int | None = None,
                  split: str = "every_third", split_seed: int = 0, refresh: bool = False,
                  workers: int = 1, align: bool = True, register_labels: bool | None = None,
                  image_size: int | None = None, sections: int | None = None,
                  tta_scales: list[float] | None = None, train_volume: str | None = None,
                  train_labels: str | None = None, test_volume: str | None = None, labels_kind: str | None = None,
                  data_list: str | None = None, membrane_width: int = DEFAULT_MEMBRANE_WIDTH,
                  verify: bool = False) -> dict:
    """Extract, split, build datasets, train, evaluate, keep the better of the new model and the
    champion, and predict the test frames with the champion; returns the run summary. The data:
    ``data_dir`` (an ISBI 2012 folder, default ``datasets/ISBI``), or ``train_volume`` and
    ``train_labels`` of ``labels_kind`` (membrane, cells or instances; default membrane), or
    ``data_list`` (a CSV of image,labels,kind rows), the latter two with an optional
    ``test_volume`` (without one, predict_test is skipped); ``membrane_width``: the membrane drawn
    between touching cells of instance labels (unet.labels.instance_mask). ``align``:
    shift val and test predictions by the offset between the train frames' predictions and their
    labels (unet/align.py). ``register_labels`` (default: the preset's): train on labels shifted onto
    their images' membranes (unet.data.label_offset). ``image_size`` (default: the preset's): the side
    of the training crops (crop recipes) or of the resized frames (resize recipes). ``sections``
    (default: the preset's): 3 feeds each frame between its neighbouring sections (2.5D).
    ``tta_scales`` (default: the preset's, ``flows.parameters.TTA_SCALES``): average the native-size predictions of
    the frame resized by each. ``verify``: check reused stage folders against their files' sha256."""
    recipe = resolve_recipe(preset, epochs=epochs, batch_size=batch_size, image_size=image_size,
                            base_channels=base_channels, learning_rate=learning_rate, tta=tta, seed=seed,
                            register_labels=register_labels, sections=sections)
    scales = resolve_scales(preset, tta_scales)
    inputs = resolve_inputs(data_dir, train_volume, train_labels, test_volume, labels_kind, data_list)
    work = str(Path(work_dir).resolve())
    stages = {}
    stages["extract"] = call_stage(extract_frames, refresh=refresh, work_dir=work,
                                   **extract_parameters(inputs, membrane_width), verify=verify)
    if recipe["input_mode"] == "crop" and len({tuple(v["frame_shape"]) for v in stages["extract"][2]["volumes"]}) > 1:
        recipe["val_batch_size"] = 1  # whole val frames of different sizes cannot share a batch (same scores)
    stages["split"] = call_stage(split_dataset, refresh=refresh, frames=stages["extract"][2], mode=split,
                                 seed=split_seed, work_dir=work, verify=verify)
    stages["datasets"] = call_stage(build_datasets, refresh=refresh, split=stages["split"][2],
                                    image_size=recipe["image_size"], input_mode=recipe["input_mode"],
                                    in_channels=recipe["in_channels"], augmentation=recipe["augmentation"],
                                    work_dir=work, verify=verify)
    datasets = stages["datasets"][2]
    stages["train"] = call_stage(train_unet, refresh=refresh, datasets=datasets, recipe=recipe, work_dir=work,
                                 workers=workers, verify=verify)
    model = stages["train"][2]
    stages["evaluate"] = call_stage(evaluate, refresh=refresh, datasets=datasets, model=model, recipe=recipe,
                                    work_dir=work, align=align, tta_scales=scales, verify=verify)
    champion = read_champion(work)
    champion_evaluation = None
    if champion is not None and champion["model"]["key"] != model["key"]:
        champion_evaluation = call_stage(evaluate, datasets=datasets, model=champion["model"],
                                         recipe=champion["recipe"], work_dir=work, align=align,
                                         tta_scales=scales, verify=verify)[2]
    run_name = runtime.flow_run.name or "local"
    decision = promote_champion(work, model, recipe, stages["evaluate"][2], champion, champion_evaluation, run_name)
    kept = decision["champion"]
    champion_export = export_champion(work)  # ONNX + MindIR + model.json of the champion, for serving
    kept_evaluation = stages["evaluate"][2] if kept["model"]["key"] == model["key"] else champion_evaluation
    if inputs.test_volume is not None:
        stages["predict"] = call_stage(predict_test, refresh=refresh, datasets=datasets, model=kept["model"],
                                       recipe=kept["recipe"], work_dir=work,
                                       alignment=kept_evaluation["metrics"]["alignment"] if align else None,
                                       tta_scales=scales, verify=verify)
    else:
        get_run_logger().info("no test volume: predict_test skipped; %s", SEGMENT_HINT)
    data = data_list or train_volume or data_dir or DEFAULT_DATA_DIR  # what the user pointed at
    parameters = {"data_dir": str(Path(data).resolve()), "work_dir": work, "preset": preset,
                  "split": split, "split_seed": split_seed, "workers": workers, "align": align, "tta_scales": scales,
                  "recipe": recipe, "pairs": [dict(pair) for pair in inputs.pairs], "test_volume": inputs.test_volume,
                  "membrane_width": membrane_width}
    summary = build_summary(run_name, parameters, stages, decision)
    summary["outputs"]["champion_export"] = champion_export
    write_summary(work, summary)
    publish_artifacts(summary)
    return summary

