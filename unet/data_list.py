"""What to train on: the three ways in, resolved to one list of (image, labels, kind) pairs.

1. ``data_dir``: a folder laid out like the ISBI 2012 challenge (``train-volume.tif``,
   ``train-labels.tif`` with ``membrane`` labels, ``test-volume.tif``).
2. ``train_volume`` + ``train_labels`` (+ ``labels_kind``, default ``membrane``).
3. ``data_list``: a CSV file with the columns ``image,labels,kind``, one row per pair (or a YAML
   file holding a list of mappings with those keys), as nnU-Net's and MONAI's data lists: paths
   relative to the list's own folder, every row's kind declared.

``test_volume`` goes with 2 and 3 and is optional: without one the predict stage is skipped. Each
image and labels path may be a TIFF stack, a folder of frames or a Zarr / OME-Zarr array.
"""
from __future__ import annotations

import csv
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet.labels import KINDS, check_kind

ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
DEFAULT_DATA_DIR = "datasets/ISBI"
COLUMNS = ("image", "labels", "kind")


@dataclass(frozen=True)
class TrainingInputs:
    """The labelled pairs (``{"image", "labels", "kind"}``, absolute paths) and the optional test
    volume."""

    pairs: tuple[dict[str, str], ...]
    test_volume: str | None


def _check_exists(path: Path, what: str, where: str | None = None) -> Path:
    """``path`` made absolute; FileNotFoundError ``path: what not found`` (``where: what path not found``)."""
    if not path.exists():
        said = f"{where}: {what} {path}" if where else f"{path}: {what}"
        raise FileNotFoundError(f"{said} not found (expected a TIFF stack, a folder of frames or a Zarr array)")
    return path.absolute()


def isbi_inputs(data_dir: str | Path) -> TrainingInputs:
    """The three ISBI stacks in ``data_dir``; FileNotFoundError naming what is missing."""
    folder = Path(data_dir)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: data folder not found (expected {', '.join(ISBI_FILES)} in it)")
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"not a folder (expected a folder holding {', '.join(ISBI_FILES)})",
                                 str(folder))
    missing = [name for name in ISBI_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    pair = {"image": str(folder / ISBI_FILES[0]), "labels": str(folder / ISBI_FILES[1]), "kind": "membrane"}
    return TrainingInputs((pair,), str(folder / ISBI_FILES[2]))


def _rows_of_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected a CSV with the header "
                             f"{','.join(COLUMNS)}")
        reader.fieldnames = header
        return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]


def _rows_of_yaml(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not readable as YAML ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"{path}: expected a YAML list of mappings with the keys {', '.join(COLUMNS)}")
    return [(i + 1, item) for i, item in enumerate(data)]


def read_data_list(path: str | Path) -> list[dict[str, str]]:
    """The pairs of a data list (CSV, or YAML for ``.yaml``/``.yml``): paths made absolute relative
    to the list's folder, each checked to exist, each kind one of :data:`unet.labels.KINDS`.
    FileNotFoundError / ValueError naming the list, its row and the bad value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data list not found (expected a CSV file with the columns "
                                f"{','.join(COLUMNS)})")
    rows = _rows_of_yaml(path) if path.suffix.lower() in (".yaml", ".yml") else _rows_of_csv(path)
    if not rows:
        raise ValueError(f"{path}: no rows; expected one row per (image, labels) pair")
    pairs, seen = [], {}
    for line, row in rows:
        where = f"{path} row {line}" if path.suffix.lower() not in (".yaml", ".yml") else f"{path} item {line}"
        values = {c: str(row.get(c) or "").strip() for c in COLUMNS}
        empty = [c for c in COLUMNS if not values[c]]
        if empty:
            raise ValueError(f"{where}: empty {', '.join(empty)}; every row needs an image, its labels and their "
                             f"kind ({', '.join(KINDS)})")
        check_kind(values["kind"], where)
        pair = {"kind": values["kind"]}
        for column in ("image", "labels"):
            given = Path(values[column]).expanduser()
            pair[column] = str(_check_exists(given if given.is_absolute() else path.parent / given, column, where))
        if pair["image"] in seen:
            raise ValueError(f"{where}: image {pair['image']} is listed twice (first in row {seen[pair['image']]})")
        seen[pair["image"]] = line
        pairs.append(pair)
    return pairs


def resolve_inputs(data_dir: str | None = None, train_volume: str | None = None, train_labels: str | None = None,
                   test_volume: str | None = None, labels_kind: str | None = None,
                   data_list: str | None = None) -> TrainingInputs:
    """The training inputs from one of the three ways in (see the module docstring); with none
    given, the ISBI folder ``datasets/ISBI``. ValueError for a mix of them, FileNotFoundError for
    a path that does not exist."""
    check_combination(data_dir, train_volume, train_labels, test_volume, labels_kind, data_list)
    test = None if test_volume is None else str(_check_exists(Path(test_volume), "test volume"))
    if data_list is not None:
        return TrainingInputs(tuple(read_data_list(data_list)), test)
    if train_volume is not None:
        pair = {"image": str(_check_exists(Path(train_volume), "train volume")),
                "labels": str(_check_exists(Path(train_labels), "train labels")), "kind": labels_kind or "membrane"}
        return TrainingInputs((pair,), test)
    return isbi_inputs(data_dir if data_dir is not None else DEFAULT_DATA_DIR)


def check_combination(data_dir: str | None = None, train_volume: str | None = None, train_labels: str | None = None,
                      test_volume: str | None = None, labels_kind: str | None = None,
                      data_list: str | None = None) -> None:
    """ValueError unless the given arguments are one of the three ways in (a usage error: nothing
    is read)."""
    explicit = train_volume is not None or train_labels is not None
    ways = [name for name, given in (("data_dir", data_dir is not None), ("train_volume/train_labels", explicit),
                                     ("data_list", data_list is not None)) if given]
    if len(ways) > 1:
        raise ValueError(f"give one of data_dir, train_volume with train_labels, or data_list; got {' and '.join(ways)}")
    if labels_kind is not None and not explicit:
        raise ValueError("labels_kind goes with train_labels (a data list declares each row's kind; an ISBI "
                         "data_dir holds membrane labels)")
    if test_volume is not None and not (explicit or data_list is not None):
        raise ValueError("test_volume goes with train_volume/train_labels or data_list (an ISBI data_dir holds "
                         "test-volume.tif)")
    if explicit and (train_volume is None or train_labels is None):
        missing = "train_labels" if train_labels is None else "train_volume"
        raise ValueError(f"train_volume and train_labels go together; {missing} is missing")
    if labels_kind is not None:
        check_kind(labels_kind)
