"""Run a pipeline script with one fault injected, chosen by the environment variable ``FAULT``:

- ``pause-in-predict``: once the predict stage has written ``PAUSE_AFTER`` files, write the file
  ``PAUSE_MARKER`` and sleep: a test then SIGKILLs the process in the middle of the stage's writes.
- ``pause-in-check``: once the input checks that run before the flow (``flows.cli.check_inputs``)
  have passed, write the file ``PAUSE_MARKER`` and sleep: a test then signals the process in the
  window where nothing has started yet.
- ``disk-full-in-extract``: the extract stage's sixth frame write fails with ENOSPC, as a
  ``write()`` on a full disk does (an OSError without a file name).

    FAULT=... python tests/robustness/run_with_fault.py flows/full_pipeline.py ARGS...
"""
import errno
import os
import runpy
import sys
import time
from pathlib import Path

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
else:
    raise SystemExit(f"unknown FAULT {FAULT!r}")

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
