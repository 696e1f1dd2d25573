"""Selection as trials finish: the trial that completes a search scores its selected configuration on the test
sets at once, in its warm worker (features read, backbone loaded, often the fit reused), while the other
searches go on; the sweep then has no test stage to wait for.

A Ray actor (no CPU of its own) collects each search's trial results by trial index. When the last expected
trial of a search reports, the configuration is selected with the sweep's rule (best validation metric, the
first in trial order on ties: :func:`orchestrator.search.select_best`) and that trial is asked to test it.
Anything it does not see complete (a restored search, a lost worker, a test that failed) is left to the sweep's
test stage, which also checks that it selects the same trial.
"""
from __future__ import annotations

from typing import Dict, Optional


class SelectionLedger:
    def __init__(self, expected: Dict[str, int], metric: str, mode: str):
        self.expected, self.metric, self.sign = dict(expected), f"val_{metric}", 1.0 if mode == "max" else -1.0
        self.reported: Dict[str, Dict[int, Optional[Dict]]] = {}
        self.claimed: Dict[str, int] = {}
        self.tested: Dict[str, Dict] = {}

    def record(self, key: str, index: int, params: Dict, metrics: Optional[Dict]) -> Optional[Dict]:
        """Record trial ``index`` of search ``key`` (``metrics`` None: it failed). Returns ``{"index", "params"}``
        of the selected trial to the one trial that completes the search, None to every other."""
        done = self.reported.setdefault(key, {})
        done[index] = None if metrics is None else {"params": params, "value": metrics.get(self.metric)}
        if key in self.claimed or key not in self.expected or len(done) < self.expected[key]:
            return None
        ok = [(i, t) for i, t in sorted(done.items()) if t is not None and t["value"] is not None]
        if not ok:
            return None
        best_index, best = max(ok, key=lambda it: self.sign * float(it[1]["value"]))
        self.claimed[key] = best_index
        return {"index": best_index, "params": best["params"]}

    def finish(self, key: str, result: Dict) -> None:
        """The test metrics (``{"metrics": ...}``) or the failure (``{"error": ...}``) of the claimed trial."""
        self.tested[key] = {"index": self.claimed[key], **result}

    def results(self) -> Dict[str, Dict]:
        return dict(self.tested)
