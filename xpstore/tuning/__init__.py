"""Learning and tuning built on the public Store API (DESIGN §7): the affinity learner
(``Learner``; docs/learning.md) and self-tuning (``Tuning``: the profiler, the auto-tuner, the
resource monitor and the pattern detector; docs/tuning.md)."""

from xpstore.tuning.learner import Learner, Prediction, StepReport
from xpstore.tuning.monitor import MemoryReading, ResourceMonitor
from xpstore.tuning.patterns import PatternDetector
from xpstore.tuning.profiler import Profiler
from xpstore.tuning.rules import TuningConfig
from xpstore.tuning.tuner import AutoTuner
from xpstore.tuning.tuning import Tuning

__all__ = [
    "AutoTuner",
    "Learner",
    "MemoryReading",
    "PatternDetector",
    "Prediction",
    "Profiler",
    "ResourceMonitor",
    "StepReport",
    "Tuning",
    "TuningConfig",
]
