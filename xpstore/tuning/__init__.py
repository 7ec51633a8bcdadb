"""Learning and tuning built on the public Store API (DESIGN §7): the affinity learner
(``Learner``; docs/learning.md). The auto-tuner, profiler and resource monitor come with their
issue."""

from xpstore.tuning.learner import Learner, Prediction, StepReport

__all__ = ["Learner", "Prediction", "StepReport"]
