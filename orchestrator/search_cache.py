"""Content-addressed cache of finished searches.

A (backbone, detector) search is determined by the feature files it reads (their keys), the
detector, its fixed parameters and search space, the number of samples, the selection metric
and the seed. Its trials (parameters + metrics) and the selected one are stored as JSON under
``<storage>/search/<key>.json``, the selected configuration's test scores next to it as Parquet.
Re-running a sweep reuses unchanged searches; changing a detector's search space changes its key
and recomputes that search only.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from orchestrator.plan import content_key, join_uri

SEARCH_VERSION = 1


def search_key(feature_keys: List[str], detector: str, fixed: Dict, space: Dict, num_samples: int, metric: str,
               seed: int, algorithm: str = "basic") -> str:
    return content_key({"v": SEARCH_VERSION, "features": sorted(feature_keys), "detector": detector, "fixed": fixed,
                        "space": space, "num_samples": num_samples, "metric": metric, "seed": seed,
                        "algorithm": algorithm})


def paths(storage: str, key: str) -> Dict[str, str]:
    return {"json": join_uri(storage, "search", f"{key}.json"),
            "scores": join_uri(storage, "search", f"{key}.scores.parquet")}


def load(storage: str, key: str) -> Optional[Dict]:
    """The cached record, or None when absent or unreadable (then the search reruns)."""
    from ood_core import storage as st

    p = paths(storage, key)
    if not (st.exists(p["json"]) and st.exists(p["scores"])):
        return None
    try:
        record = json.loads(st.read_bytes(p["json"]).decode())
    except (ValueError, OSError):
        return None
    if record.get("key") != key or "trials" not in record or "selected" not in record:
        return None
    return record


def save(storage: str, key: str, trials: List[Dict], selected: int) -> None:
    from ood_core import storage as st

    record = {"key": key, "trials": trials, "selected": selected}
    with st.atomic_output(paths(storage, key)["json"]) as f:
        f.write(json.dumps(record, default=float).encode())
