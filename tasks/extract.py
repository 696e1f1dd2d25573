"""Ray task: run a trained backbone once over a data set and store its features in Parquet."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from tasks.runtime import input_format, load_backbone, setup_worker


def extract_dataset(backbone: Dict, feature: Dict, layers: List[Dict], num_classes: int, fmt: Dict,
                    batch_size: int, shard: Optional[Tuple[int, int, str]] = None) -> Dict:
    """Write the features of ``feature["dataset"]`` to ``feature["uri"]`` (atomic, with its content hash
    recorded in ``<uri>.sha256``; reused when its content matches that hash and its structure is valid,
    set aside when damaged).

    ``shard = (start, stop, part_uri)``: only rows ``start:stop`` of the data set, to ``part_uri`` (no cache
    check, no hash: :func:`merge_shards` joins the parts into ``feature["uri"]``). ``start`` is a multiple of
    ``batch_size``, so the shard's batches are the whole set's and its values the same.

    Returns extraction stats plus ``cached`` (True when an intact file was already there).
    """
    import torch

    from ood_core.data import load_dataset
    from ood_core.feature_store import check_feature_file
    from ood_core.hooks import LayerSpec, extract_features
    from ood_core.storage import remove_abandoned_outputs

    specs = [LayerSpec(name=l["name"], module=l["module"], reduction=l["reduction"]) for l in layers]
    if shard is None:
        check = check_feature_file(feature["uri"], [s.column for s in specs])
        if check.note:  # the driver checked first; this sees only what changed since (another sweep's writes)
            print(f"[extract] {backbone['label']}/{feature['dataset']['label']}: {check.note}", flush=True)
        if check.ok:
            return {"uri": feature["uri"], "cached": True}

    device = setup_worker()
    ds = feature["dataset"]
    data = load_dataset(ds["dataset"], split=ds["split"], fmt=input_format(fmt), seed=ds["seed"], **ds["params"])
    start, uri = 0, feature["uri"]
    if shard is not None:
        start, stop, uri = int(shard[0]), int(shard[1]), shard[2]
        data = torch.utils.data.Subset(data, range(start, min(stop, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                         pin_memory=device.type == "cuda")
    model = load_backbone(backbone, num_classes, fmt).to(device)
    metadata = {"backbone_key": backbone["key"], "backbone": backbone["label"], "dataset": ds["label"],
                "dataset_spec": json.dumps({k: ds[k] for k in ("dataset", "split", "params", "seed")}, sort_keys=True),
                "split": ds["split"], "role": ds["role"], "feature_key": feature["key"]}

    from tasks.progress import worker_progress

    what = f"extract {backbone['label']}/{ds['label']}" + (f" rows {start}-{start + len(data)}" if shard else "")
    bar = worker_progress(len(data), what, "images")  # updated per sample
    stats = extract_features(model, loader, specs, uri, metadata=metadata, device=device, progress=bar,
                             writer_options={"record_hash": shard is None, "dtype": feature.get("dtype", "float32")},
                             index_start=start)
    bar.close()
    if shard is None:  # a writer of this file killed with its node left its temporary output: remove it
        remove_abandoned_outputs(uri, dead_writers_only=True)
    return {"uri": uri, "cached": False, **stats}


def merge_shards(feature: Dict, parts: List[str]) -> Dict:
    """Join the shard files ``parts`` (in row order) into ``feature["uri"]`` with its content hash, then
    delete them, and the partial outputs of shard attempts that died with their node (every shard task of these
    parts, which carry this sweep's token, has returned)."""
    from ood_core.feature_store import merge_feature_files
    from ood_core.storage import remove, remove_abandoned_outputs

    rows = merge_feature_files(parts, feature["uri"], record_hash=True)
    for part in parts:
        remove(part)
        remove_abandoned_outputs(part)
    return {"uri": feature["uri"], "cached": False, "n": rows, "shards": len(parts)}
