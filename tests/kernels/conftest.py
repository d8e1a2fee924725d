"""Kernel tests run Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a kernel is
decorated); squeeze.kernels imports its Triton modules lazily, so setting it here, at conftest
import time, is early enough even if another test module imported torch (or triton) first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
