"""The configuration: schema, foreign names, loading and rules."""

from .load import ConfigError, Problem, Resolved, load_config, resolve
from .schema import Config

__all__ = ["Config", "ConfigError", "Problem", "Resolved", "load_config", "resolve"]
