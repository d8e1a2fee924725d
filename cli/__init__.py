"""squeeze.cli: click commands over the Python API."""
