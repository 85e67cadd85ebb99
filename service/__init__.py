"""rlgen's service: experiment specs, the algorithm registry, MLflow tracking and Ray execution."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlgen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
