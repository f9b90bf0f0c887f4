"""The run report's metric rows, alignment, test-time scales and registered-labels lines."""
from tasks.report import alignment_text, label_shift_text, metrics_rows, scales_text

FIVE = ("acc", "iou", "dice", "sens", "spec")


def _metrics(dy: float, dx: float, applied: bool = True) -> dict:
    scores = {k: 0.9 for k in FIVE}
    return {"val_native": scores, "val_native_unaligned": {k: 0.8 for k in FIVE},
            "alignment": {"applied": applied, "dy": dy, "dx": dx, "mse_before": 0.05, "mse_after": 0.04}}


def _sets(metrics: dict) -> list[str]:
    return [row["set"] for row in metrics_rows(metrics)]


def test_the_unaligned_row_appears_only_when_the_predictions_moved():
    assert "val (ours, native unaligned)" in _sets(_metrics(-0.5, -0.25))
    assert "val (ours, native unaligned)" not in _sets(_metrics(0.0, 0.0))


def test_alignment_line_names_the_shift_or_is_absent():
    assert "dy -0.50 dx -0.25 px" in alignment_text(_metrics(-0.5, -0.25))
    assert alignment_text(_metrics(0.0, 0.0, applied=False)) is None
    assert alignment_text({"val_native": {}}) is None  # evaluations made before alignment existed


def test_registered_labels_line_names_the_shift_or_is_absent():
    assert "dy +0.50 dx +0.25 px" in label_shift_text({"label_shift": [0.5, 0.25]})
    assert label_shift_text({"label_shift": [0.0, 0.0]}) is None
    assert label_shift_text({"label_shift": None}) is None  # models trained before register_labels


def test_scales_line_lists_the_scales_or_is_absent():
    assert "resized by 0.875, 1, 1.125" in scales_text({"tta_scales": [0.875, 1.0, 1.125]})
    assert scales_text({"tta_scales": [1.0]}) is None
    assert scales_text({"val_native": {}}) is None  # evaluations made before scales existed
