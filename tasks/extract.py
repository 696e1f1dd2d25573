"""Ray task: run a trained backbone once over a data set and store its features in Parquet."""
from __future__ import annotations

import json
from typing import Dict, List

from tasks.runtime import input_format, load_backbone, setup_worker


def extract_dataset(backbone: Dict, feature: Dict, layers: List[Dict], num_classes: int, fmt: Dict,
                    batch_size: int) -> Dict:
    """Write the features of ``feature["dataset"]`` to ``feature["uri"]`` (atomic, with its content hash
    recorded in ``<uri>.sha256``; reused when its content matches that hash and its structure is valid,
    set aside when damaged).

    Returns extraction stats plus ``cached`` (True when an intact file was already there).
    """
    import torch

    from ood_core.data import load_dataset
    from ood_core.feature_store import check_feature_file
    from ood_core.hooks import LayerSpec, extract_features

    specs = [LayerSpec(name=l["name"], module=l["module"], reduction=l["reduction"]) for l in layers]
    check = check_feature_file(feature["uri"], [s.column for s in specs])
    if check.note:  # the driver checked first; this sees only what changed since (another sweep's writes)
        print(f"[extract] {backbone['label']}/{feature['dataset']['label']}: {check.note}", flush=True)
    if check.ok:
        return {"uri": feature["uri"], "cached": True}

    device = setup_worker()
    ds = feature["dataset"]
    data = load_dataset(ds["dataset"], split=ds["split"], fmt=input_format(fmt), seed=ds["seed"], **ds["params"])
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                         pin_memory=device.type == "cuda")
    model = load_backbone(backbone, num_classes, fmt).to(device)
    metadata = {"backbone_key": backbone["key"], "backbone": backbone["label"], "dataset": ds["label"],
                "dataset_spec": json.dumps({k: ds[k] for k in ("dataset", "split", "params", "seed")}, sort_keys=True),
                "split": ds["split"], "role": ds["role"], "feature_key": feature["key"]}

    from tasks.progress import worker_progress

    bar = worker_progress(len(data), f"extract {backbone['label']}/{ds['label']}", "images")  # updated per sample
    stats = extract_features(model, loader, specs, feature["uri"], metadata=metadata, device=device, progress=bar,
                             writer_options={"record_hash": True})
    bar.close()
    return {"uri": feature["uri"], "cached": False, **stats}
