"""Peak resident memory of hooked extraction with every layer hooked (``preset: all``, energy reduction).

    python benchmarks/extraction_memory.py --n 4096            # with the pipeline's malloc setting
    python benchmarks/extraction_memory.py --n 4096 --no-fix   # glibc defaults

Prints the resident set size after every few batches; bounded memory means a flat series.
"""
import argparse
import os
import tempfile

import torch

from ood_core.hooks import LayerSpec, extract_features, select_layers
from ood_core.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-fix", action="store_true", help="leave glibc's dynamic mmap threshold alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.no_fix:
        from tasks.runtime import fix_malloc_fragmentation

        fix_malloc_fragmentation()
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=0).eval()
    specs = [LayerSpec("logits"), LayerSpec("penultimate")]
    specs += [LayerSpec(m, m, "energy") for m in select_layers(model, preset="all")]
    data = torch.utils.data.TensorDataset(torch.randn(args.n, 3, 32, 32), torch.zeros(args.n, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    rss = []
    page = os.sysconf("SC_PAGE_SIZE")
    with tempfile.TemporaryDirectory() as tmp:
        extract_features(model, loader, specs, os.path.join(tmp, "f.parquet"), metadata={}, device="cpu",
                         progress=lambda k: rss.append(int(open("/proc/self/statm").read().split()[1]) * page / 2**20))
    step = max(1, len(rss) // 8)
    print(f"resnet18, {len(specs)} columns, n={args.n}, fix={'off' if args.no_fix else 'on'}: "
          f"RSS MiB after batches {', '.join(str(round(r)) for r in rss[::step])}; peak {max(rss):.0f}")


if __name__ == "__main__":
    main()
