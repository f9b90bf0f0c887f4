"""Stage 1: the labelled volumes (and an optional test volume) -> one PNG per frame (images/,
masks/ with 255 = cell converted from each pair's labels kind, test/) and frames.csv.

The key hashes each input's content (a file's bytes; a folder of frames or a Zarr array: its files'
names and bytes), each pair's labels kind and the membrane width (given only when a pair holds
instance labels), never the paths: moving the data leaves the key as it was."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, file_digest, run_stage


def input_digest(path: str) -> str:
    """sha256 of a volume's content: a file's bytes, or a folder's / Zarr array's files (names and bytes)."""
    if Path(path).is_dir():
        from unet.volume_io import content_digest, open_volume

        return content_digest(open_volume(path))
    return file_digest(path)


class ExtractPolicy(StagePolicy):
    """The stage policy, keyed by the content of the volumes the pairs and the test volume name."""

    def content_key(self, inputs: dict[str, Any]) -> str:
        keyed = dict(inputs)
        keyed["pairs"] = [{**pair, "image": input_digest(pair["image"]), "labels": input_digest(pair["labels"])}
                          for pair in inputs["pairs"]]
        keyed["test_volume"] = None if inputs.get("test_volume") is None else input_digest(inputs["test_volume"])
        return super().content_key(keyed)


POLICY = ExtractPolicy(stage="extract", module="tasks/extract.py")


@task(name="extract_frames", cache_policy=POLICY)
def extract_frames(pairs: list[dict], test_volume: str | None, work_dir: str, membrane_width: int | None = None,
                   refresh: bool = False) -> dict:
    """Read and validate every pair ({"image", "labels", "kind"}) and the test volume (None: none);
    write ``00000.png``, ``00001.png``... per frame (``v0-00000.png``... for several volumes).
    ``membrane_width``: of instance labels (:func:`unet.labels.instance_mask`)."""
    from unet.frames import extract_pairs
    from unet.labels import DEFAULT_MEMBRANE_WIDTH

    def build(folder):
        info = extract_pairs(pairs, test_volume, folder, membrane_width or DEFAULT_MEMBRANE_WIDTH)
        volumes = ", ".join(f"{v['frames']} of {v['frame_shape'][0]}x{v['frame_shape'][1]} ({v['kind']} labels)"
                            for v in info["volumes"])
        get_run_logger().info("extracted %s labelled frames (%s) and %s test frames", info["train_frames"],
                              volumes, info["test_frames"] if test_volume else "no")
        return {"images": "images", "masks": "masks", "test": "test", "frames_csv": "frames.csv", **info}

    return run_stage(POLICY, build)
