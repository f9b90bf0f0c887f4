"""Run a pipeline script with one fault injected, chosen by the environment variable ``FAULT``:

- ``pause-in-predict``: once the predict stage has written ``PAUSE_AFTER`` files, write the file
  ``PAUSE_MARKER`` and sleep: a test then SIGKILLs the process in the middle of the stage's writes.
- ``pause-in-check``: once the input checks that run before the flow (``flows.cli.check_inputs``)
  have passed, write the file ``PAUSE_MARKER`` and sleep: a test then signals the process in the
  window where nothing has started yet.
- ``disk-full-in-extract``: the extract stage's sixth frame write fails with ENOSPC, as a
  ``write()`` on a full disk does (an OSError without a file name).
- ``pause-at``: write the file ``PAUSE_MARKER`` and sleep at the point ``PAUSE_POINT`` (the kill
  matrix's points, kill_matrix_support.POINTS): ``check`` (as ``pause-in-check``); ``before:STAGE``
  and ``after:STAGE`` in the flow, around the stage's task; ``mid:STAGE`` inside the stage: extract
  after 5 frames written, split and datasets once their ``.partial`` folder exists, train in epoch
  2 (its steps done, its validation running, epoch 1 checkpointed), evaluate after 3 val
  predictions written, predict after 5 test files written; ``mid:segment-volume`` in
  ``python flows/segment.py`` once three batches of blocks are done. The sleep is in the main thread
  (the pipeline's flow calls its tasks directly; the segmentation's flow collects its batches there).

    FAULT=... python tests/robustness/run_with_fault.py flows/full_pipeline.py ARGS...
"""
import errno
import os
import runpy
import sys
import time
from pathlib import Path

# As flows/full_pipeline.py does first thing: the hooks below import MindSpore (threads start), after
# which the pipeline's own call can no longer turn forwarding on and a Ctrl-C in training became
# SIGTERM (exit 143) — a fault of this harness, not of the pipeline.
from flows.sigint import forward_sigint  # noqa: E402

forward_sigint()

FAULT = os.environ["FAULT"]
_count = []

if FAULT == "pause-in-predict":
    import unet.infer as infer

    marker, after, write = Path(os.environ["PAUSE_MARKER"]), int(os.environ.get("PAUSE_AFTER", "4")), infer._imwrite

    def _imwrite(path, image):
        write(path, image)
        if f"{os.sep}predict{os.sep}" in str(path):
            _count.append(path)
            if len(_count) == after:
                marker.write_text(str(path))
                time.sleep(3600)

    infer._imwrite = _imwrite
elif FAULT == "pause-in-check":
    import flows.cli as cli

    marker, check = Path(os.environ["PAUSE_MARKER"]), cli.check_inputs

    def check_inputs(*args, **kwargs):
        found = check(*args, **kwargs)
        marker.write_text("checked")
        time.sleep(3600)
        return found

    cli.check_inputs = check_inputs
elif FAULT == "disk-full-in-extract":
    import unet.frames as frames

    write_png = frames._write_png

    def _write_png(frame, path):
        _count.append(path)
        if len(_count) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_png(frame, path)

    frames._write_png = _write_png
elif FAULT == "pause-at":
    marker, point = Path(os.environ["PAUSE_MARKER"]), os.environ["PAUSE_POINT"]
    where, _, stage = point.partition(":")

    def pause() -> None:
        marker.write_text(point)
        time.sleep(3600)

    if point == "check":
        import flows.cli as cli

        check = cli.check_inputs

        def check_inputs(*args, **kwargs):
            found = check(*args, **kwargs)
            pause()
            return found

        cli.check_inputs = check_inputs
    elif where in ("before", "after"):
        import tasks.stage as stage_module

        call = stage_module.call_stage

        def call_stage(task_fn, **kwargs):
            here = task_fn.fn.__module__.rsplit(".", 1)[-1] == stage  # tasks.extract -> extract
            if here and where == "before":
                pause()
            result = call(task_fn, **kwargs)
            if here and where == "after":
                pause()
            return result

        stage_module.call_stage = call_stage
    elif point in ("mid:extract", "mid:evaluate", "mid:predict"):
        import unet.frames as frames
        import unet.infer as infer

        after = {"extract": 5, "evaluate": 3, "predict": 5}[stage]
        module, name = (frames, "_write_png") if stage == "extract" else (infer, "_imwrite")
        write = getattr(module, name)

        def counted_write(*args):
            write(*args)
            path = args[-1] if stage == "extract" else args[0]
            if f"{os.sep}{stage}{os.sep}" in str(path):
                _count.append(path)
                if len(_count) == after:
                    pause()

        setattr(module, name, counted_write)
    elif point in ("mid:split", "mid:datasets"):
        import tasks.stage as stage_module

        run = stage_module.run_stage

        def run_stage(policy, build, *args, **kwargs):
            def paused_build(folder):
                pause()
                return build(folder)

            return run(policy, paused_build if policy.stage == stage else build, *args, **kwargs)

        stage_module.run_stage = run_stage
    elif point == "mid:segment-volume":
        # python flows/segment.py: the flow (main thread) pauses once it has collected the third
        # finished batch of blocks (--blocks-per-task 1: three blocks written and marked done)
        import prefect.futures as futures

        collect = futures.as_completed

        def as_completed(*args, **kwargs):
            for n, future in enumerate(collect(*args, **kwargs), 1):
                yield future
                if n == 3:
                    pause()

        futures.as_completed = as_completed
    elif point == "mid:train":
        import unet.train as train

        evaluate = train.evaluate_case_metrics

        def evaluate_case_metrics(*args, **kwargs):
            if sys._getframe(1).f_code.co_name == "train":
                _count.append(1)
                if len(_count) == 2:  # epoch 2's validation
                    pause()
            return evaluate(*args, **kwargs)

        train.evaluate_case_metrics = evaluate_case_metrics
    else:
        raise SystemExit(f"unknown PAUSE_POINT {point!r}")
else:
    raise SystemExit(f"unknown FAULT {FAULT!r}")

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
