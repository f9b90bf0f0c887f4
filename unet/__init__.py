"""UNet-2D for EM segmentation (ISBI 2012): a plain library, no Prefect, no global configuration.

Importing this package is cheap: MindSpore is imported only by the modules that need it
(``unet.model``, ``unet.data``, ``unet.train``, ``unet.infer``).
"""
import os

# MindSpore's oneDNN picks a convolution kernel on AVX-512 CPUs that falls back to a reference
# implementation: convolutions run ~100x slower than with the AVX2 kernels (measured in
# shared/notes/findings.md). The cap must be in the environment before mindspore is imported, so
# it is set here, once, for every module of the package; a value the user set is kept.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# MindSpore logs INFO/WARNING to stderr by default; keep errors only unless the user asks.
os.environ.setdefault("GLOG_v", "3")

__version__ = "0.1.0"
