"""squeeze.calib: calibration data sources, packing, streaming statistics and the sequential
block runner."""

from squeeze.calib.packing import Calibration, pack
from squeeze.calib.sources import load_rows

__all__ = ["Calibration", "load_rows", "pack"]
