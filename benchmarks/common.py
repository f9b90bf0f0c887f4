"""Shared helpers of the benchmark scripts: machine description, FLOP count, peak memory."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def unet_forward_flops(in_channels: int, base: int, height: int, width: int) -> float:
    """Multiply-adds x 2 of the UNet's convolutions for one image (pool/resize/BN ignored)."""
    def conv(cin, cout, h, w, k=3):
        return 2.0 * cin * cout * k * k * h * w

    b, total, h, w = base, 0.0, height, width
    chans = [in_channels, b, 2 * b, 4 * b, 8 * b, 16 * b]
    for level in range(5):  # encoder double convs
        total += conv(chans[level], chans[level + 1], h, w) + conv(chans[level + 1], chans[level + 1], h, w)
        if level < 4:
            h, w = h // 2, w // 2
    for level in range(4, 0, -1):  # decoder: concat(skip, up) -> double conv
        h, w = h * 2, w * 2
        cin = chans[level + 1] + chans[level]
        total += conv(cin, chans[level], h, w) + conv(chans[level], chans[level], h, w)
    total += conv(b, 1, height, width, k=1)
    return total


def emit(record: dict) -> None:
    """Print one JSON line with the machine description."""
    print(json.dumps({**record, "machine": machine()}))
