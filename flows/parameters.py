"""The main job's parameters turned into what its stages take: the recipe (a preset and the options
that override it), the test-time scales and the extract stage's inputs. Shared by the flow
(:mod:`flows.full_pipeline`) and its command line (:mod:`flows.cli`), which checks them before
anything starts. No task imports this module, so changing it re-runs no stage by itself."""
from __future__ import annotations

from unet.data_list import TrainingInputs
from unet.labels import check_membrane_width
from unet.recipes import get_preset

# The flow parameters (and CLI options) that override a field of the preset's recipe.
RECIPE_OVERRIDES = ("epochs", "batch_size", "image_size", "base_channels", "learning_rate", "tta", "seed",
                    "register_labels", "sections")


# Each preset's test-time scales for its native-size predictions (default: the frame as it is).
# Inference only: changing them re-runs evaluate and predict, never training. fullres: measured on its
# champion, docs/results.md#test-time-scales.
TTA_SCALES = {"fullres": (0.875, 1.0, 1.125)}


def resolve_scales(preset: str, tta_scales: list[float] | None = None) -> list[float]:
    """The given test-time scales, else the preset's; ValueError outside 0.25..4."""
    scales = [float(s) for s in (tta_scales or TTA_SCALES.get(preset, (1.0,)))]
    if any(not 0.25 <= s <= 4.0 for s in scales):
        raise ValueError(f"tta_scales must be between 0.25 and 4, got {scales}")
    return scales


def resolve_recipe(preset: str, **overrides) -> dict:
    """The preset with the given overrides, validated (ValueError on a bad value). ``sections=3``
    also sets ``in_channels`` to 3: one input channel per section."""
    if overrides.get("sections") == 3:
        overrides["in_channels"] = 3
    return get_preset(preset).replace(**overrides).to_dict()


def extract_parameters(inputs: TrainingInputs, membrane_width: int) -> dict:
    """The extract stage's inputs: the pairs, the test volume, and the membrane width when a pair
    holds instance labels (the only ones it changes, so only their key depends on it)."""
    instances = any(pair["kind"] == "instances" for pair in inputs.pairs)
    return {"pairs": [dict(pair) for pair in inputs.pairs], "test_volume": inputs.test_volume,
            "membrane_width": check_membrane_width(membrane_width) if instances else None}
