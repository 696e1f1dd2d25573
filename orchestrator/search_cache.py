"""Content-addressed cache of finished searches.

A (backbone, detector) search is determined by the feature files it reads (their keys), the
detector, its fixed parameters and search space, the number of samples, the selection metric
and the seed. Its trials (parameters + metrics) and the selected one are stored as JSON under
``<storage>/search/<key>.json``, the selected configuration's test scores next to it as Parquet.
Re-running a sweep reuses unchanged searches; changing a detector's search space changes its key
and recomputes that search only. Both files carry their sha256 (``<file>.sha256``, written after the
file); :func:`load` reuses a search only when both match it, and sets a damaged one aside
(``<file>.damaged-<time>``, said in one line) so that the search runs again.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from orchestrator.plan import content_key, join_uri

SEARCH_VERSION = 1


def search_key(feature_keys: List[str], detector: str, fixed: Dict, space: Dict, num_samples: int, metric: str,
               seed: int, algorithm: str = "basic", test_every_trial: bool = False) -> str:
    spec = {"v": SEARCH_VERSION, "features": sorted(feature_keys), "detector": detector, "fixed": fixed,
            "space": space, "num_samples": num_samples, "metric": metric, "seed": seed, "algorithm": algorithm}
    if test_every_trial:  # trials' records then hold test metrics too
        spec["test_every_trial"] = True
    return content_key(spec)


def paths(storage: str, key: str) -> Dict[str, str]:
    return {"json": join_uri(storage, "search", f"{key}.json"),
            "scores": join_uri(storage, "search", f"{key}.scores.parquet")}


def _say(label: Optional[str], note: str) -> None:
    print(f"[search] {label}: {note}" if label else f"[search] {note}", flush=True)


def load(storage: str, key: str, label: Optional[str] = None) -> Optional[Dict]:
    """The cached record, or None when absent, damaged or unreadable (then the search reruns).

    Both files must match their recorded sha256 (:func:`ood_core.storage.verify_cached`); a damaged or
    unreadable one is set aside and said in one line (prefixed ``[search] <label>:`` when ``label`` is given).
    """
    from ood_core import storage as st

    p = paths(storage, key)
    if not (st.exists(p["json"]) and st.exists(p["scores"])):
        return None  # not cached, or half written (the search reruns and overwrites it)
    record_check = st.verify_cached(p["json"], "search record", redo="searching again")
    if record_check.status == "unhashed":  # an older ood-sweep wrote both: one line for the search
        _say(label, "cached search has no content hash (written by an older ood-sweep); searching again")
        return None
    if record_check.note:
        _say(label, record_check.note)
    scores_check = st.verify_cached(p["scores"], "search scores file", redo="searching again")
    if scores_check.note and scores_check.status != "unhashed":  # unhashed: simply overwritten by the rerun
        _say(label, scores_check.note)
    if not (record_check.ok and scores_check.ok):
        return None
    try:
        record = json.loads(st.read_bytes(p["json"]).decode())
        complete = record.get("key") == key and "trials" in record and "selected" in record
    except (ValueError, OSError, AttributeError) as exc:
        complete, reason = False, f"unreadable: {type(exc).__name__}"
    else:
        reason = "incomplete record"
    if not complete:  # intact bytes that are not a record of this search
        _say(label, st.discard_cached(p["json"], "search record", reason, "searching again"))
        return None
    return record


def save(storage: str, key: str, trials: List[Dict], selected: int) -> None:
    from ood_core import storage as st

    record = {"key": key, "trials": trials, "selected": selected}
    with st.atomic_output(paths(storage, key)["json"], record_hash=True) as f:
        f.write(json.dumps(record, default=float).encode())


# ---------------------------------------------------------------- per-backbone analyses (neural collapse, ...)

def analysis_key(kind: str, feature_keys: List[str], backbone_key: str) -> str:
    """The key of an analysis (``kind``) of one backbone's cached features: what it reads, nothing else."""
    return content_key({"v": 1, "analysis": kind, "features": sorted(feature_keys), "backbone": backbone_key})


def analysis_path(storage: str, key: str) -> str:
    return join_uri(storage, "analysis", f"{key}.json")


def load_analysis(storage: str, key: str, label: str) -> Optional[Dict]:
    """A cached analysis result, or None (absent; damaged: set aside and said, then computed again)."""
    from ood_core import storage as st

    uri = analysis_path(storage, key)
    check = st.verify_cached(uri, "analysis record", redo="computing again")
    if check.note and check.status != "unhashed":
        print(f"[analysis] {label}: {check.note}", flush=True)
    if not check.ok:
        return None
    try:
        return json.loads(st.read_bytes(uri).decode())["values"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        print(f"[analysis] {label}: " + st.discard_cached(uri, "analysis record", f"unreadable: {type(exc).__name__}",
                                                           "computing again"), flush=True)
        return None


def save_analysis(storage: str, key: str, values: Dict) -> None:
    from ood_core import storage as st

    with st.atomic_output(analysis_path(storage, key), record_hash=True) as f:
        f.write(json.dumps({"key": key, "values": values}, default=float).encode())
