"""A short real-data training (smoke recipe, real ISBI frames) and inference from its checkpoint."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from unet.align import Alignment, shift
from unet.infer import load_model, predict_files, predict_frame
from unet.metrics import confusion_counts, confusion_scores
from unet.recipes import PRESETS
from unet.train import train


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    recipe = PRESETS["smoke"]
    rows = []
    result = train(recipe, frames["train"], frames["val"], out, on_epoch=rows.append)
    return recipe, result, out, rows


def test_training_writes_checkpoints_and_history(trained):
    recipe, result, out, rows = trained
    assert (out / "best.ckpt").is_file() and (out / "last.ckpt").is_file()
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(1, recipe.epochs + 1))
    assert {"loss", "train_iou", "val_iou", "val_spec", "seconds"} <= set(history.columns)
    assert len(rows) == recipe.epochs
    assert json.loads((out / "last.json").read_text())["epoch"] == recipe.epochs
    assert result.best_epoch == int(history.loc[history["val_iou"].idxmax(), "epoch"])


def _val_scores(result, recipe, val_pairs) -> tuple[dict, dict, dict]:
    """Scores of the best checkpoint on the native 512x512 val frames (threshold 0.5, no TTA or
    alignment), and of the two constant predictors, all-cell and all-membrane, computed from the
    val labels: ``confusion_scores`` (unet/metrics.py, both classes) plus ``mean_iou``, the mean of
    cell and membrane IoU."""
    net = load_model(result.best_checkpoint, recipe)
    masks = np.stack([cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 127 for _, m in val_pairs])
    probs = np.stack([predict_frame(net, cv2.imread(str(i), cv2.IMREAD_GRAYSCALE), recipe) for i, _ in val_pairs])

    def scores(pred):
        s = confusion_scores(sum(confusion_counts(p, t) for p, t in zip(pred, masks)))
        return {**s, "mean_iou": (s["cell_iou"] + s["membrane_iou"]) / 2}
    return scores(probs >= 0.5), scores(np.ones_like(masks)), scores(np.zeros_like(masks))


# The smoke preset (5 epochs x 10 steps at 64 px) is too short to beat the all-cell predictor on cell
# IoU: val cell IoU ~0.69 (its best_val_iou, 0.6896) against the all-cell predictor's 0.78 (the
# cell share of these val frames). Membrane Dice and the mean of cell and membrane IoU judge both
# classes: all-cell scores 0 and 0.39 on them, all-membrane 0.36 and 0.11. The models must beat the
# better constant by these margins; measured on these 10 val frames, native size (best over the two
# constants in brackets): smoke membrane Dice 0.498 (+0.139), mean IoU 0.510 (+0.120); with boundary
# weights 0.546 (+0.187), 0.519 (+0.128); on registered labels 0.540 (+0.181), 0.513 (+0.122).
MEMBRANE_DICE_MARGIN = 0.10
MEAN_IOU_MARGIN = 0.08


def assert_beats_constant_predictors(result, recipe, val_pairs) -> None:
    model, all_cell, all_membrane = _val_scores(result, recipe, val_pairs)
    print({k: round(v["membrane_dice"], 4) for k, v in
           (("model", model), ("all-cell", all_cell), ("all-membrane", all_membrane))},
          {k: round(v["mean_iou"], 4) for k, v in
           (("model", model), ("all-cell", all_cell), ("all-membrane", all_membrane))})
    assert all_cell["membrane_dice"] == 0.0 and all_cell["cell_iou"] > 0.7  # the floors are what they claim
    for score, margin in (("membrane_dice", MEMBRANE_DICE_MARGIN), ("mean_iou", MEAN_IOU_MARGIN)):
        floor = max(all_cell[score], all_membrane[score])
        assert model[score] > floor + margin, (score, model[score], floor)


def test_loss_goes_down_and_model_beats_the_constant_predictors(trained, frames):
    recipe, result, out, _ = trained
    history = pd.read_csv(out / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert_beats_constant_predictors(result, recipe, frames["val"])


@pytest.mark.slow  # about 40 s of training
def test_boundary_weighted_training_learns(frames, tmp_path):
    # the mask column is [N, 2, H, W] (mask and weight map) through the dataset and the step
    recipe = PRESETS["smoke"].replace(loss="bce_dice", boundary_weight=10.0)
    result = train(recipe, frames["train"], frames["val"], tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert 0.0 < history["train_iou"].iloc[-1] <= 1.0  # scored against the mask channel only
    assert_beats_constant_predictors(result, recipe, frames["val"])


@pytest.mark.slow  # about 55 s of training
def test_training_on_registered_labels_learns_and_reports_the_shift(frames, tmp_path):
    # soft masks (the labels shifted by a sub-pixel offset) through the loss and the batch scores
    recipe = PRESETS["smoke"].replace(loss="bce_dice", boundary_weight=10.0, register_labels=True)
    result = train(recipe, frames["train"], frames["val"], tmp_path)
    assert result.label_shift == (0.5, 0.25)  # ISBI's labels, measured on the 20 train frames
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert_beats_constant_predictors(result, recipe, frames["val"])


def test_resume_continues_after_the_last_epoch(trained, frames, tmp_path):
    recipe, _, out, _ = trained
    for name in ("last.ckpt", "last.json", "history.csv", "best.ckpt"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    longer = recipe.replace(epochs=recipe.epochs + 1)
    result = train(longer, frames["train"], frames["val"], tmp_path, resume=True)
    assert result.epochs_run == 1
    assert list(pd.read_csv(tmp_path / "history.csv")["epoch"]) == list(range(1, longer.epochs + 1))


class _Killed(Exception):
    pass


def test_resume_after_an_interruption_is_bit_identical_to_an_uninterrupted_training(trained, frames, tmp_path):
    """Stopped after epoch 3 (its last.ckpt written, as a kill during epoch 4 leaves it), then resumed:
    the weights, the optimizer state and every history number equal the uninterrupted run's exactly.
    Measured: max difference 0.0 in history and in every checkpoint parameter. Each epoch's sample
    order and augmentation are seeded by (seed, epoch, sample) (unet/data.py), last.ckpt holds the
    weights, the BatchNorm statistics and Adam's moments and step, and the smoke recipe uses no
    random op in the network, so nothing depends on where training started."""
    import mindspore as ms

    recipe, result, out, _ = trained

    def stop_after_epoch_3(row):
        if row["epoch"] == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(recipe, frames["train"], frames["val"], tmp_path, on_epoch=stop_after_epoch_3)
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 3
    resumed = train(recipe, frames["train"], frames["val"], tmp_path, resume=True)
    assert resumed.epochs_run == 2
    numbers = [c for c in pd.read_csv(out / "history.csv").columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv")[numbers],
                                  pd.read_csv(out / "history.csv")[numbers], check_exact=True)
    assert (resumed.best_epoch, resumed.best_val_iou) == (result.best_epoch, result.best_val_iou)
    assert resumed.weights_sha256 == result.weights_sha256
    for name in ("last.ckpt", "best.ckpt"):  # last.ckpt: the optimizer state too
        a, b = ms.load_checkpoint(str(out / name)), ms.load_checkpoint(str(tmp_path / name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(b[key].asnumpy(), a[key].asnumpy(), err_msg=f"{name}: {key}")


@pytest.mark.slow  # about 15 s; the resume itself is tested bit-identical in CI
def test_resume_trusts_the_state_inside_last_ckpt_over_a_stale_last_json(trained, frames, tmp_path):
    # a kill between the replace of last.ckpt and the one of last.json leaves last.json an epoch behind
    recipe, _, out, _ = trained
    for name in ("last.ckpt", "last.json", "history.csv", "best.ckpt"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    stale = json.loads((out / "last.json").read_text())
    stale["epoch"] -= 1
    (tmp_path / "last.json").write_text(json.dumps(stale))
    longer = recipe.replace(epochs=recipe.epochs + 1)
    result = train(longer, frames["train"], frames["val"], tmp_path, resume=True)
    assert result.epochs_run == 1  # epoch 5's weights are not trained on epoch 5 again
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == list(range(1, longer.epochs + 1))
    pd.testing.assert_frame_equal(history.iloc[:recipe.epochs], pd.read_csv(out / "history.csv"))

def test_inference_writes_native_masks_tiff_and_overlays(trained, frames, tmp_path):
    recipe, result, _, _ = trained
    net = load_model(result.best_checkpoint, recipe)
    images = [img for img, _ in frames["val"][:3]]
    out = predict_files(net, images, recipe, tmp_path)
    probs = tifffile.imread(out.probabilities)
    assert probs.shape == (3, 512, 512) and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    np.testing.assert_array_equal(out.cell_prob, probs)  # what the tasks score is what was written
    for img in images:
        mask = cv2.imread(str(out.masks / img.name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(out.overlays / img.name)).shape == (512, 512, 3)


def test_inference_with_an_alignment_writes_the_shifted_probabilities(trained, frames, tmp_path):
    recipe, result, _, _ = trained
    net = load_model(result.best_checkpoint, recipe)
    images = [img for img, _ in frames["val"][:2]]
    plain = predict_files(net, images, recipe, tmp_path / "plain")
    assert plain.unaligned_prob is None
    moved = predict_files(net, images, recipe, tmp_path / "moved", align=Alignment(dy=1.0, dx=-0.5))
    np.testing.assert_array_equal(moved.unaligned_prob, plain.cell_prob)
    np.testing.assert_allclose(moved.cell_prob, shift(plain.cell_prob, 1.0, -0.5), atol=1e-6)
    np.testing.assert_array_equal(tifffile.imread(moved.probabilities), moved.cell_prob)
    mask = cv2.imread(str(moved.masks / images[0].name), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, np.where(moved.cell_prob[0] >= 0.5, 255, 0))


def _crop_setup(trained, frames, h: int, w: int):
    """The trained smoke model, its recipe as a crop (whole-frame) recipe, the top-left h x w of a val frame."""
    recipe, result, _, _ = trained
    net = load_model(result.best_checkpoint, recipe)
    frame = cv2.imread(str(frames["val"][0][0]), cv2.IMREAD_GRAYSCALE)[:h, :w]
    return net, frame, recipe.replace(input_mode="crop")


@pytest.mark.slow  # about 70 s; tests/unet/test_blocks.py and the segmentation flow tests cover the block engine in CI
def test_blocks_equal_the_whole_frame_with_and_without_tta(trained, frames):
    # 200 x 300 is no multiple of the network's 16: blocks of 128 with the default halo (the
    # receptive field, unet.blocks.default_halo) must still give whole-frame inference, to float noise
    net, frame, crop_recipe = _crop_setup(trained, frames, 200, 300)
    for tta in (False, True):
        whole = predict_frame(net, frame, crop_recipe, tta=tta)
        tiled = predict_frame(net, frame, crop_recipe, tta=tta, block=128)
        assert whole.shape == tiled.shape == (200, 300)
        print(f"tta {tta}: max |blocks - whole| = {np.abs(whole - tiled).max():.2e}")
        np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # a halo narrower than the receptive field does change the result: the halo is what makes it exact
    narrow = predict_frame(net, frame, crop_recipe, block=128, halo=16)
    assert np.abs(narrow - predict_frame(net, frame, crop_recipe)).max() > 1e-4
    # the 8 TTA views average to something else than the plain view
    plain = predict_frame(net, frame, crop_recipe)
    assert np.abs(predict_frame(net, frame, crop_recipe, tta=True) - plain).max() > 1e-3


def test_checkpoint_of_another_recipe_is_rejected(trained):
    from unet.backends import load_predictor

    recipe, result, _, _ = trained
    with pytest.raises(ValueError, match="does not match"):
        load_model(result.best_checkpoint, recipe.replace(base_channels=16))
    # ONNX Runtime's path checks the weights without building MindSpore's network
    with pytest.raises(ValueError, match=r"best.ckpt: does not match the recipe 'smoke' .*base_channels=16.*"
                                         r"enc1.block.0.weight has shape \(8, 1, 3, 3\), expected \(16, 1, 3, 3\)"):
        load_predictor(result.best_checkpoint, recipe.replace(base_channels=16), "onnxruntime")
    with pytest.raises(ValueError, match="in_channels=3"):
        load_predictor(result.best_checkpoint, recipe.replace(in_channels=3), "onnxruntime")
    with pytest.raises(FileNotFoundError, match="nothing.ckpt: checkpoint not found"):
        load_predictor(result.best_checkpoint.parent / "nothing.ckpt", recipe, "onnxruntime")


def test_parameter_shapes_are_the_networks(trained):
    """unet.export.parameter_shapes (the ONNX path's weight check) lists the MindSpore UNet's
    parameters, for the smoke recipe and a 3-channel base-32 one."""
    from unet.export import parameter_shapes
    from unet.model import UNet

    recipe = trained[0]
    for config in (recipe, recipe.replace(in_channels=3, base_channels=32)):
        net = UNet(config.in_channels, config.base_channels)
        assert parameter_shapes(config) == {p.name: tuple(p.shape) for p in net.get_parameters()}


def test_case_metrics_on_onnx_runtime_are_trainings_validation(trained, frames):
    """The evaluate stage scores the case metrics on ONNX Runtime (unet.evaluate.case_metrics): the
    best epoch's validation that training computed on MindSpore, to float precision."""
    from unet.backends import load_predictor
    from unet.data import SegmentationSource, eval_transforms
    from unet.evaluate import case_metrics

    recipe, result, out, _ = trained
    val = SegmentationSource(frames["val"], eval_transforms(recipe), recipe.in_channels)
    got = case_metrics(load_predictor(result.best_checkpoint, recipe, "onnxruntime"), val, recipe.val_batch_size)
    best = pd.read_csv(out / "history.csv").set_index("epoch").loc[result.best_epoch]
    for metric in ("acc", "iou", "dice", "sens", "spec"):
        assert got[metric] == pytest.approx(best[f"val_{metric}"], abs=1e-5), metric


def test_test_time_scales_average_the_resized_predictions(trained, frames):
    recipe = trained[0]
    net, frame, crop_recipe = _crop_setup(trained, frames, 192, 256)
    plain = predict_frame(net, frame, crop_recipe)
    np.testing.assert_array_equal(predict_frame(net, frame, crop_recipe, scales=(1.0,)), plain)
    # by hand: the frame at 3/4 size, predicted, resized back; averaged with the plain prediction
    small = cv2.resize(frame, (192, 144), interpolation=cv2.INTER_LINEAR)
    back = cv2.resize(predict_frame(net, small, crop_recipe), (256, 192), interpolation=cv2.INTER_LINEAR)
    both = predict_frame(net, frame, crop_recipe, scales=(0.75, 1.0))
    assert both.shape == (192, 256) and both.dtype == np.float32
    np.testing.assert_allclose(both, (back + plain) / 2, atol=1e-5)
    assert np.abs(both - plain).max() > 1e-3  # the second scale changed something
    # resize recipes scale their input size: 64 * 1.25 = 80
    resized = predict_frame(net, frame, recipe, scales=(1.25,))
    by_hand = cv2.resize(predict_frame(net, cv2.resize(frame, (80, 80)), recipe.replace(image_size=80)),
                         (256, 192), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resized, by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="test-time scales must be between 0.25 and 4"):
        predict_frame(net, frame, crop_recipe, scales=(0.1,))


def test_the_onnx_graph_equals_the_mindspore_network_on_real_frames(trained, frames, tmp_path):
    """unet/export.py writes the graph from the weights (MindSpore cannot export its bilinear resize):
    ONNX Runtime must give MindSpore's probabilities, for the trained smoke network and for an
    untrained fullres-sized one (base 32), on real frames, with and without TTA."""
    import mindspore as ms

    from unet.backends import load_predictor, predict_views
    from unet.data import to_network_input
    from unet.model import UNet

    recipe, result, _, _ = trained
    ms.set_seed(1)
    fullres = PRESETS["fullres"]
    ms.save_checkpoint(UNet(fullres.in_channels, fullres.base_channels), str(tmp_path / "fullres.ckpt"))
    frame = cv2.imread(str(frames["val"][0][0]), cv2.IMREAD_GRAYSCALE)
    for checkpoint, config, image in ((result.best_checkpoint, recipe, cv2.resize(frame, (64, 64))),
                                      (tmp_path / "fullres.ckpt", fullres, frame[:256, :320])):
        x = to_network_input(image, config.in_channels)
        for tta in ("none", "d4"):
            a = predict_views(load_predictor(checkpoint, config, "mindspore"), x, tta)
            b = predict_views(load_predictor(checkpoint, config, "onnxruntime"), x, tta)
            print(f"{config.name} {tta}: max |onnxruntime - mindspore| = {np.abs(a - b).max():.2e}")
            np.testing.assert_allclose(b, a, atol=1e-4)
            # not a constant map (the untrained network's spread is ~5e-4): the comparison means something
            assert a.std() > 1e-4 and np.abs(a - b).max() < 0.01 * a.std()
