"""The attention algorithms (transition: registry only until every op file exists)."""
from .registry import (REASONS, Algorithm, FastPathError, HeadSpec, Reason,  # noqa: F401
                       fast_algorithms, get, register, registry, unregister)
