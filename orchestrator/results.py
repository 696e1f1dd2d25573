"""Read a finished sweep's results back from MLflow (for ``python -m orchestrator report``)."""
from __future__ import annotations

import json
import tempfile
from typing import Dict, List, Optional

from orchestrator.errors import UserError


def latest_rows(tracking_uri: str, experiment: str, where: Optional[str] = None) -> List[Dict]:
    """Rows of the results table of the newest finished sweep run of ``experiment``.

    The store must exist (``orchestrator.locations.require_store``: MLflow's client would create an empty one);
    ``where`` names it in messages (default: the URI). A name the store does not hold is refused with the
    names it does hold, so a typo or the wrong store shows at once."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    where = where or tracking_uri
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        held = f"it holds {', '.join(repr(n) for n in names)}" if names else "it holds no sweep"
        raise UserError(f"no sweep named {experiment!r} in the MLflow store {where}; {held}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'sweep' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"no finished sweep run in experiment {experiment!r} of the MLflow store {where} (the sweep "
                        "has not finished yet, or failed before its end)")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(runs[0].info.run_id, "results.parquet", tmp)
        frame = pd.read_parquet(path)
    rows = []
    for rec in frame.to_dict("records"):
        rec["selected"] = json.loads(rec.get("selected") or "{}")
        rows.append({k: v for k, v in rec.items() if not (isinstance(v, float) and v != v)})
    return rows
