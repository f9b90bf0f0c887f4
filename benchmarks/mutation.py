"""Mutation score: the share of small code changes (mutants) that the fast tests notice.

    .venv/bin/python benchmarks/mutation.py [--jobs 2] [--nice 15] [MODULE ...]   (or: make mutation)

For each module (default: all of TARGETS, in that order), in a fresh copy of the project under
``mutants/<name>/`` (git-ignored; the files of HEAD, or of the working tree with ``--worktree``),
mutmut 3.8.1 mutates that module alone and runs the fast tests listed for it in TARGETS (each
mutant only those of them that call the mutated function). A mutant is *killed* when a test fails,
*survives* when all pass, *times out* when its tests take more than 10 x (their clean time + 10 s),
and has *no tests* when none of the listed tests calls its function.
Score = (killed + timeouts) / mutants run.

``--survivors-only`` retests only the survivors of the last run (after tests were added: mutmut
keeps every other verdict); ``--report`` runs nothing and prints the last runs' figures, of a
stopped run too ("not run" mutants left out of its score).

Prints a table (one row per module, markdown, as in tests/README.md) and one JSON line; writes each
module's surviving mutants as diffs to ``mutants/<name>/survivors.txt`` and mutmut's log to
``mutants/<name>/mutmut.log``. Not part of CI: the five modules take hours on 2 busy cores.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import common

REPO = common.REPO
VENV_BIN = Path(sys.executable).parent
WORK = REPO / "mutants"

# module -> the fast tests that exercise it (never the slow or integration ones; tests/README.md).
# tests/tasks/test_code_keys.py is left out of tasks/stage.py's: it hashes the whole project twice
# per case (about 100 s in all); tests/tasks/test_stage_mutants.py tests the same closure on a
# small project.
TARGETS = {
    "unet/metrics.py": ["tests/unet/test_metrics.py", "tests/unet/test_properties.py"],
    "unet/split.py": ["tests/unet/test_split.py", "tests/unet/test_properties.py", "tests/unet/test_several_volumes.py"],
    "unet/align.py": ["tests/unet/test_align.py"],
    "unet/segment.py": ["tests/unet/test_segment_cells.py"],
    "tasks/stage.py": ["tests/tasks/test_stage.py", "tests/tasks/test_stage_mutants.py", "tests/tasks/test_verify.py",
                       "tests/robustness/test_stage_writes.py"],
}
# Tests left out. test_case_metrics_in_model_eval: mutmut forks one process per mutant from a process
# that has imported MindSpore, and MindSpore's dataset pipeline hangs in a forked process (every
# mutant that reached this test timed out). test_verify's tiny_disk tests mount a tmpfs, which a
# mutant's process ended on timeout would leave mounted; test_stage_writes.py tests the same
# full-disk paths with a simulated ENOSPC.
DESELECTED = {
    "unet/metrics.py": ["tests/unet/test_metrics.py::test_case_metrics_in_model_eval"],
    "tasks/stage.py": ["tests/tasks/test_verify.py::test_a_full_disk_in_a_build_removes_the_partial_folder",
                       "tests/tasks/test_verify.py::test_a_disk_that_fills_up_with_the_files_fails_the_manifest_and_keeps_nothing"],
}
COPIED = ("unet", "tasks", "flows", "tests", "pyproject.toml")
COUNTED = ("killed", "survived", "timeout", "no tests", "not checked")


def isbi_dir() -> str:
    """Where the tests would find the ISBI stacks (tests/conftest.py's order): the copy under
    mutants/ is one folder deeper, so its conftest cannot find ../shared by itself."""
    if os.environ.get("ISBI_DATA_DIR"):
        return os.environ["ISBI_DATA_DIR"]
    local = REPO / "datasets" / "ISBI"
    return str(local if (local / "train-volume.tif").is_file() else REPO.parent / "shared" / "data" / "isbi2012")


def setup_cfg(module: str, tests: list[str]) -> str:
    """mutmut's configuration: the whole packages copied, ``module`` alone mutated."""
    lines = ["[mutmut]", "source_paths =", "    unet", "    tasks", "    flows", f"only_mutate = {module}",
             "pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args =", "    -m", "    not slow and not integration", "    -p", "    no:cacheprovider"]
    for test in DESELECTED.get(module, []):
        lines += ["    --deselect", f"    {test}"]
    # mutmut's wall-clock limit is (clean time + constant) x multiplier, 15.75 s for a 50 ms test by
    # default: on a loaded machine under nice that times out mutants that are fine. 10 x (t + 10 s)
    # still ends a mutant stuck in a loop after a few minutes at most.
    lines += ["use_git_change_detection = false", "timeout_multiplier = 10.0", "timeout_constant = 10.0", ""]
    return "\n".join(lines)


def stage(module: str, commit: str | None) -> Path:
    """A fresh copy of the project for ``module``'s run, mutants/<name>/: the files of ``commit``, or
    of the working tree when None."""
    root = WORK / module.removesuffix(".py").replace("/", "-")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if commit:
        archive = subprocess.run(["git", "archive", "--format=tar", commit, *COPIED], cwd=REPO,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
    else:
        ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache")
        for name in COPIED:
            src = REPO / name
            shutil.copytree(src, root / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, root / name)
    tests = [t for t in TARGETS[module] if (root / t).is_file()]
    (root / "setup.cfg").write_text(setup_cfg(module, tests))
    (root / "commit.txt").write_text(f"source and tests: {commit or 'worktree'}\n")
    return root


def mutmut(root: Path, args: list[str], niceness: int, log=None, program: str = "mutmut") -> tuple[int, str]:
    """Run ``mutmut ARGS`` (or another ``program`` of the venv) in ``root``: (exit code, output;
    written to ``log`` instead when given). It runs in a session of its own, ended with everything it
    forked if this script is stopped."""
    env = {**os.environ, "ISBI_DATA_DIR": isbi_dir(), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["nice", "-n", str(niceness), str(VENV_BIN / program), *args]
    out = subprocess.PIPE if log is None else log
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output or ""


def results(root: Path, niceness: int) -> dict[str, str]:
    """``{mutant name: status}`` from ``mutmut results --all true``."""
    out = mutmut(root, ["results", "--all", "true"], niceness)[1]
    return dict(re.findall(r"^\s+(\S+): (.+)$", out, flags=re.M))


# ``mutmut show NAME`` for many names in one process
SHOW = """import sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
for name in sys.argv[1:]:
    print(f"# {name}")
    print(get_diff_for_mutant(name, path=find_mutant(name).path))
"""


def refresh_tests(root: Path, commit: str | None) -> None:
    """Put the current tests (of ``commit``, or of the working tree) into an existing run's copies."""
    if commit:
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "tests"], cwd=REPO,
                                 capture_output=True, check=True).stdout
    for copy in (root, root / "mutants"):
        shutil.rmtree(copy / "tests")
        if commit:
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(copy, filter="data")
        else:
            shutil.copytree(REPO / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))


def run_module(module: str, jobs: int, niceness: int, commit: str | None, survivors_only: bool,
               report_only: bool = False) -> dict:
    t0 = time.perf_counter()
    root = WORK / module.removesuffix(".py").replace("/", "-")
    if report_only:
        exit_code = None
    elif survivors_only:
        previous = results(root, niceness) if (root / "mutants").is_dir() else {}
        if not previous:
            raise SystemExit(f"error: {root.relative_to(REPO)} holds no earlier run of {module} to retest")
        refresh_tests(root, commit)
        with (root / "commit.txt").open("a") as f:
            f.write(f"tests for the survivors: {commit or 'worktree'}\n")
        names = sorted(n for n, s in previous.items() if s in ("survived", "no tests"))
    else:
        root, names = stage(module, commit), []
    if not report_only:
        with (root / "mutmut.log").open("a" if survivors_only else "w") as log:
            exit_code = mutmut(root, ["run", "--max-children", str(jobs), *names], niceness, log)[0]
    status = results(root, niceness)
    counts = {k: sum(s == k for s in status.values()) for k in COUNTED}
    other = len(status) - sum(counts.values())
    survivors = sorted(n for n, s in status.items() if s in ("survived", "no tests"))
    (root / "survivors.txt").write_text(mutmut(root, ["-c", SHOW, *survivors], niceness, program="python")[1])
    detected = counts["killed"] + counts["timeout"]
    checked = len(status) - counts["not checked"]  # all of them, unless the run was stopped
    tests = [t for t in TARGETS[module] if (root / t).is_file()]
    source = (root / "commit.txt").read_text().strip() if (root / "commit.txt").is_file() else "?"
    return {"module": module, "commit": source, "tests": tests, "mutants": len(status), **counts, "other": other,
            "score": round(100.0 * detected / checked, 1) if checked else None,
            "exit_code": exit_code, "minutes": round((time.perf_counter() - t0) / 60, 1),
            "survivors": survivors}


def table(rows: list[dict]) -> str:
    lines = ["| module | mutants | killed | survived | timeouts | no tests | not run | score |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.1f} %"
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['timeout']} "
                     f"| {r['no tests']} | {r['not checked']} | {score} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", default=list(TARGETS), help=f"default: {' '.join(TARGETS)}")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once (mutmut --max-children)")
    p.add_argument("--nice", type=int, default=15, help="niceness of the mutmut processes")
    p.add_argument("--worktree", action="store_true",
                   help="test the working tree's files (default: those of the commit checked out, HEAD)")
    p.add_argument("--survivors-only", action="store_true",
                   help="retest only the mutants that survived the last run of each module (after new tests)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: the figures of the last runs (of a stopped one too: score over the mutants run)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that mutmut's session is ended too
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        raise SystemExit(f"error: unknown module {unknown[0]}; expected one of {', '.join(TARGETS)}")
    if not (VENV_BIN / "mutmut").is_file():
        raise SystemExit(f"error: {VENV_BIN / 'mutmut'} not found; install the dev extra: pip install -e '.[dev]'")
    commit = None if args.worktree else subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                        text=True, check=True).stdout.strip()
    if args.report:
        commit = None
        print("figures of the last runs under mutants/ (each run's commits: mutants/<name>/commit.txt)", flush=True)
    else:
        print(f"testing {'the working tree' if commit is None else 'commit ' + commit[:7]}", flush=True)
    rows = []
    for module in args.modules:
        row = run_module(module, args.jobs, args.nice, commit, args.survivors_only, args.report)
        rows.append(row)
        print(f"{module}: {row['mutants']} mutants, {row['killed']} killed, {row['survived']} survived, "
              f"{row['timeout']} timeouts, {row['no tests']} no tests, {row['not checked']} not run, score {row['score']} % "
              f"({row['minutes']} min, mutmut exit code {row['exit_code']}; survivors: "
              f"{(WORK / module.removesuffix('.py').replace('/', '-') / 'survivors.txt').relative_to(REPO)})",
              flush=True)
    print(table(rows))
    common.emit({"benchmark": "mutation", "commit": "report" if args.report else commit or "worktree", "rows": [{k: v for k, v in r.items() if k != "survivors"} for r in rows]})


if __name__ == "__main__":
    main()
