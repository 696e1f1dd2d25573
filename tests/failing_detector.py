"""A detector of the tests' own, given to sweeps by import path (``failing_detector:FailingAbove``):
it fails in ``fit`` for searched values above ``limit``, so that tests can see failed trials."""
from ood_core.api import FeaturesDetector
from ood_core.constraints import Interval, Param


class FailingAbove(FeaturesDetector):
    """Scores = the feature norm; ``fit`` raises for ``value > limit`` (https://example.invalid, a test double)."""

    requires_fit = True
    parameter_constraints = {"value": Param(Interval(int, 0, None)), "limit": Param(Interval(int, 0, None))}

    def __init__(self, model=None, value: int = 0, limit: int = 1):
        super().__init__(model)
        self.value, self.limit = value, limit

    def _fit(self, x, y):
        if self.value > self.limit:
            raise ValueError(f"value {self.value} is above the limit {self.limit}")

    def _score(self, x):
        return x.norm(dim=1)


class ConstantScores(FeaturesDetector):
    """Scores every sample 1.0: a detector that ranks nothing (https://example.invalid, a test double)."""

    parameter_constraints = {}

    def _score(self, x):
        return x.new_ones(x.shape[0])
