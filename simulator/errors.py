"""Errors of the simulator; each message names the node, field or value at fault."""

from bbct.golden.errors import BbctError


class ConfigError(BbctError):
    """A configuration key or value is not allowed."""


class UnsupportedGraphError(BbctError):
    """The ONNX graph holds an op or a structure the importer does not support."""


class LoweringError(BbctError):
    """The model cannot be lowered with the given configuration."""


class ExecutionError(BbctError):
    """Bad run-time input (ids out of range, shapes that do not fit the lowered model)."""
