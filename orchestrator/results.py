"""Read a finished sweep's results back from MLflow (for ``python -m orchestrator report``)."""
from __future__ import annotations

import json
import tempfile
from typing import Dict, List

from orchestrator.errors import UserError


def latest_rows(tracking_uri: str, experiment: str) -> List[Dict]:
    """Rows of the results table of the newest finished sweep run of ``experiment``."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no sweep named {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'sweep' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"no finished sweep run in experiment {experiment!r} ({tracking_uri})")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(runs[0].info.run_id, "results.parquet", tmp)
        frame = pd.read_parquet(path)
    rows = []
    for rec in frame.to_dict("records"):
        rec["selected"] = json.loads(rec.get("selected") or "{}")
        rows.append({k: v for k, v in rec.items() if not (isinstance(v, float) and v != v)})
    return rows
