"""What every stage shares: content-based cache keys, stage folders written through a ``.partial``
folder renamed into place, a manifest per folder, and a per-stage lock.

A stage's **key** hashes (1) the content of its input files, (2) the keys of the upstream stages
it reads (each upstream folder is itself named by its key, so this chains content all the way
from the TIFFs), (3) its parameters, and (4) the code it runs: the source of its task module and
of every project module that module imports, directly or not (:func:`code_closure`, read from the
import statements, never listed by hand), and the versions of the libraries that change results
(:data:`RESULT_PACKAGES`). A comment-only edit changes the key too: the source is hashed as it is.
The output folder is ``<work_dir>/<stage>/<key>``; Prefect's cache key is the same key plus the
work directory, so two work directories never share results.

A finished folder's manifest lists the size and sha256 of every file the stage wrote. Before a
finished folder is reused (a Prefect cache hit or a folder found on disk), every file must exist
with its size; with ``verify`` (``--verify``) its content must also match the hash. A damaged
folder is logged (one warning naming it and its first bad file) and the stage is computed again.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect.cache_policies import CachePolicy

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
NOT_KEYED = ("work_dir", "refresh")  # inputs that do not change what a stage computes
PACKAGES = ("mindspore", "albumentations", "opencv-python-headless", "numpy", "scikit-image", "prefect")


def file_digest(path: Path | str) -> str:
    """sha256 of a file's content; a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PROJECT_PACKAGES = ("unet", "tasks", "flows")
# the libraries whose versions change what a stage computes (prefect only runs it)
RESULT_PACKAGES = ("mindspore", "albumentations", "opencv-python-headless", "numpy", "scikit-image")


def _imported_modules(path: Path, root: Path) -> set[str]:
    """The project modules (paths relative to ``root``) that the module at ``path`` imports, at
    module level or inside functions: for ``a.b.c``, the files of ``a``, ``a.b`` and ``a.b.c``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from unet import blocks`` imports the submodule unet/blocks.py
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PROJECT_PACKAGES:
                continue
            for i in range(1, len(parts) + 1):
                for candidate in (Path(*parts[:i]) / "__init__.py", Path(*parts[:i]).with_suffix(".py")):
                    if (root / candidate).is_file():
                        found.add(candidate.as_posix())
    return found


def code_closure(modules: tuple[str, ...], root: Path = REPO) -> tuple[str, ...]:
    """``modules`` (paths relative to ``root``) and every project module they import, transitively."""
    todo, seen = list(modules), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imported_modules(root / module, root) - seen)
    return tuple(sorted(seen))


def code_version(modules: tuple[str, ...], root: Path = REPO) -> str:
    """sha256 over the source of ``modules`` (paths relative to ``root``) and the versions of
    :data:`RESULT_PACKAGES`."""
    h = hashlib.sha256()
    for rel in sorted(modules):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    for package in RESULT_PACKAGES:
        h.update(f"{package}=={version(package)}".encode())
    return h.hexdigest()[:16]


def _fingerprint(name: str, value: Any, files: tuple[str, ...]) -> Any:
    if name in files:
        return file_digest(value)
    if isinstance(value, dict) and "stage" in value and "key" in value:
        return f"{value['stage']}:{value['key']}"  # an upstream stage's result
    return value


@dataclass
class StagePolicy(CachePolicy):
    """Prefect cache policy of one stage: see the module docstring. ``module``: the task module
    (relative to the repository); ``launched``: modules it starts as programs rather than imports
    (``python -m unet.msrun_worker``); ``code`` becomes their import closure (or that of the given
    ``code`` modules, without a ``module``)."""

    stage: str = ""
    module: str = ""
    launched: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # inputs that are paths of files to hash by content
    code: tuple[str, ...] = ()
    code_digest: str = ""  # computed once, when the task module is imported: the code this process runs

    def __post_init__(self) -> None:
        self.code = code_closure((self.module, *self.launched) if self.module else self.code)
        self.code_digest = code_version(self.code)

    def content_key(self, inputs: dict[str, Any]) -> str:
        keyed = {k: _fingerprint(k, v, self.files) for k, v in sorted(inputs.items()) if k not in NOT_KEYED}
        payload = json.dumps({"stage": self.stage, "code": self.code_digest, "inputs": keyed},
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        work_dir = str(Path(inputs["work_dir"]).resolve())
        where = hashlib.sha256(work_dir.encode()).hexdigest()[:8]
        return f"{self.stage}-{self.content_key(inputs)}-{where}"


@contextlib.contextmanager
def _locked(lock_path: Path, shared: bool = False) -> Iterator[None]:
    """An exclusive advisory lock: a second run on the same stage and key waits here. ``shared``:
    any number of shared holders at once, while no one holds it exclusively."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` but the manifest, by path relative to it."""
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            records[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return records


def find_damage(folder: Path | str, verify: bool = False) -> str | None:
    """Why a finished stage folder cannot be reused, naming its first bad file, or None when it can:
    a file of the manifest is missing or has another size; with ``verify``, another content (sha256).
    A manifest without file records (written before they existed) is reused as before, except with
    ``verify``: it cannot be checked, so the stage is computed again."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        records = manifest.get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{MANIFEST}: unreadable ({exc})"
    if records is None:
        return f"{MANIFEST}: no file sizes and hashes to verify (written by an older version)" if verify else None
    for rel, record in records.items():
        try:
            size = (folder / rel).stat().st_size
        except OSError:
            return f"{rel}: missing"
        if size != record["size"]:
            return f"{rel}: {size} bytes, expected {record['size']}"
    if verify:
        for rel, record in records.items():
            if file_digest(folder / rel) != record["sha256"]:
                return f"{rel}: content differs from its sha256 in the manifest"
    return None


# Whether reused stage folders are checked against their files' hashes (see verifying()).
_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("verify_stage_hashes", default=False)


@contextlib.contextmanager
def verifying(verify: bool = True) -> Iterator[None]:
    """Within: stage folders that :func:`run_stage` reuses are checked against their hashes too (a
    context variable: Prefect runs a task called from the flow in the caller's context)."""
    token = _VERIFY.set(verify)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _intact(folder: Path | str, then: str) -> bool:
    """Whether the finished ``folder`` is intact (:func:`find_damage`; hashes too within
    :func:`verifying`); a damaged one is logged with ``then``, what happens instead."""
    problem = find_damage(folder, _VERIFY.get())
    if problem:
        _log().warning("%s: damaged stage folder (%s); %s", folder, problem, then)
    return problem is None


def _manifest(policy: StagePolicy, key: str, inputs: dict[str, Any], result: dict, seconds: float,
              folder: Path) -> dict:
    return {
        "stage": policy.stage,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "code_version": policy.code_digest,
        "code": list(policy.code),
        "inputs": {k: _fingerprint(k, v, policy.files) for k, v in inputs.items() if k not in NOT_KEYED},
        "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES},
        "host": platform.node(),
        "result": result,
        "files": file_records(folder),
    }


def is_finished(folder: Path | str) -> bool:
    """A stage folder is finished when its manifest exists (written last, before the rename)."""
    return (Path(folder) / MANIFEST).is_file()


def current_inputs() -> dict[str, Any]:
    """The parameters of the running task (what its cache key was computed from)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:
        raise RuntimeError("current_inputs() must be called inside a Prefect task run")
    return dict(ctx.parameters)


def run_stage(policy: StagePolicy, build: Callable[[Path], dict], inputs: dict[str, Any] | None = None,
              *, resumable: bool = False) -> dict:
    """Run ``build(folder)`` for the stage unless its finished folder exists, and return
    ``{"stage", "key", "output", **result}`` where ``result`` is what ``build`` returned (paths
    in it relative to the folder). A finished folder is reused only when intact (:func:`find_damage`;
    hashes too within :func:`verifying`), else built again. ``build`` writes into ``<key>.partial``,
    which becomes ``<key>`` only after the manifest (with the size and sha256 of every file) is
    written; a resumable stage keeps a partial folder left by a killed run and continues from it
    (unless ``refresh``), any other stage starts it afresh and removes it when ``build`` fails.
    ``inputs`` default to the running task's parameters.

    An ``OSError`` without a file name (a failed ``write()``, e.g. ENOSPC) is re-raised naming the
    stage folder, so that the one-line error says where the disk filled up."""
    inputs = current_inputs() if inputs is None else inputs
    work_dir = Path(inputs["work_dir"]).resolve()
    key = policy.content_key(inputs)
    final = work_dir / policy.stage / key
    partial = final.with_name(key + ".partial")
    with _locked(work_dir / ".locks" / f"{policy.stage}-{key}.lock"):
        _remove_stale(final)
        if is_finished(final) and not inputs.get("refresh") and _intact(final, "computing the stage again"):
            result = json.loads((final / MANIFEST).read_text())["result"]
        else:
            if partial.exists() and (not resumable or inputs.get("refresh")):
                shutil.rmtree(partial)
            try:
                partial.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                result = build(partial)
                manifest = _manifest(policy, key, inputs, result, time.perf_counter() - t0, partial)
                _write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=2, default=str))
                _replace_dir(partial, final)
            except Exception as exc:
                if not resumable:
                    shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs
                if isinstance(exc, OSError) and exc.errno is not None and not exc.filename:
                    raise OSError(exc.errno, f"{exc.strerror or exc} (while writing the {policy.stage} stage)",
                                  str(partial)) from exc
                raise
    return {"stage": policy.stage, "key": key, "output": str(final), **result}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale(final: Path) -> None:
    """Folders a killed refresh left between its two renames (``<key>.old-<pid>``)."""
    if final.parent.is_dir():
        for old in final.parent.glob(f"{final.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a refresh) is moved aside first."""
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def outputs_exist(result: dict) -> bool:
    """Whether a (possibly cached) stage result still points at a finished folder, and an intact
    one (a damaged one is logged: not used)."""
    return (isinstance(result, dict) and "output" in result and is_finished(result["output"])
            and _intact(result["output"], "not used"))


def call_stage(task_fn, *, refresh: bool = False, verify: bool = False, **kwargs) -> tuple[str, float, dict]:
    """Run a stage task and return (state name, seconds, result).

    A Prefect cache hit whose stage folder was deleted or damaged since (:func:`find_damage`; with
    ``verify``, the hashes of its files too) is run again (only that stage), and ``refresh``
    recomputes the stage even when its cache record and folder exist."""
    t0 = time.perf_counter()
    task_fn = task_fn.with_options(refresh_cache=True) if refresh else task_fn
    with verifying(verify):
        state = task_fn(refresh=refresh, return_state=True, **kwargs)
        result = state.result()
        if state.name == "Cached" and find_damage(result["output"], verify):  # deleted or damaged since
            # the task runs again: its run_stage logs the damage and recomputes the stage (or finds
            # the folder gone, or reuses it if another run has recomputed it meanwhile)
            state = task_fn.with_options(refresh_cache=True)(refresh=refresh, return_state=True, **kwargs)
            result = state.result()
    return state.name, time.perf_counter() - t0, result
