"""unitscale_fx: make any Transformer unit-scaled in one call.

    import unitscale_fx
    model = unitscale_fx.transform(model)   # then train as usual
"""
from .analysis.record import META_KEY, ScaleRecord, Stat
from .api import AnalysisResult, TransformResult, analyse, transform
from .config import Config
from .errors import (
    AlreadyTransformedError,
    CaptureError,
    ConfigError,
    InputMismatchError,
    MissingRuleError,
    MissingRuleWarning,
    PassError,
    UnitScaleError,
)
from .module import UnitScaledModule
from .probe import ProbeResult, ScaleProbe, measure_step
from .track import track

__all__ = [
    "transform", "analyse", "Config", "UnitScaledModule", "TransformResult", "AnalysisResult",
    "ScaleProbe", "ProbeResult", "measure_step", "META_KEY", "ScaleRecord", "Stat",
    "UnitScaleError", "CaptureError", "ConfigError", "MissingRuleError", "PassError",
    "AlreadyTransformedError", "InputMismatchError", "MissingRuleWarning", "track",
]
__version__ = "0.1.0"
