"""Fixtures of the library tests."""
import cv2
import pytest
import tifffile


@pytest.fixture(scope="session")
def frames(isbi_dir, tmp_path_factory):
    """The 30 real labelled ISBI frames as PNG pairs, split as the case does (every third to val)."""
    d = tmp_path_factory.mktemp("frames")
    vol = tifffile.imread(isbi_dir / "train-volume.tif")
    lab = tifffile.imread(isbi_dir / "train-labels.tif")
    pairs = []
    for i in range(len(vol)):
        cv2.imwrite(str(d / f"{i:05d}.png"), vol[i])
        cv2.imwrite(str(d / f"{i:05d}_mask.png"), lab[i])
        pairs.append((d / f"{i:05d}.png", d / f"{i:05d}_mask.png"))
    return {"train": [p for i, p in enumerate(pairs) if i % 3], "val": pairs[::3]}
