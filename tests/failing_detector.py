"""A detector of the tests' own, given to sweeps by import path (``failing_detector:FailingAbove``):
it fails in ``fit`` for searched values above ``limit``, so that tests can see failed trials."""
from ood_core.api import FeaturesDetector
from ood_core.constraints import Instance, Interval, Param


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


class CountingFits(FeaturesDetector):
    """Scores = ``scale`` x the distance to the training mean, shifted by ``offset``; every ``fit`` appends
    ``<pid> scale=<scale>`` to the file ``log``, so that tests can count fits (https://example.invalid, a test
    double). ``offset`` only changes scoring (``structural=False``); ``scale`` changes the fit."""

    requires_fit = True
    parameter_constraints = {"log": Param(Instance((str,))), "scale": Param(Interval(float, 0, None)),
                             "offset": Param(Interval(float, None, None), structural=False)}

    def __init__(self, model=None, log: str = "", scale: float = 1.0, offset: float = 0.0):
        super().__init__(model)
        self.log, self.scale, self.offset = log, scale, offset

    def _fit(self, x, y):
        import os

        self.mean_ = self.scale * x.mean(dim=0)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} scale={self.scale}\n")

    def _score(self, x):
        return (self.scale * x - self.mean_).norm(dim=1) + self.offset
