"""The local launcher's data path: decoding each batch vs selecting it from the device cache.

Times, on one shard dataset, what a flow-matching step waits for before its forward pass:

- ``decode``: ``LocalReader.batches`` (an Arrow ``take`` of the batch's rows) then the objective's
  ``collate`` (per-row ``frombuffer``, padding, stacking, the copy to the device), every step;
- ``cached``: ``data.device_cache_mb`` > 0: the whole dataset collated once (reported apart),
  then ``ShardBatch.select`` of the batch's rows on the device, every step.

    python benchmarks/local_data.py --shards runs/teachers/shards --batch 1024 2048
    python benchmarks/local_data.py --shards runs/teachers/shards --device cuda   # on a GPU box

Prints a markdown table (ms per batch, rows/s); the numbers in docs/performance.md came from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(batches, device, count: int) -> float:
    """Seconds per batch over ``count`` batches (the first one is a warm-up)."""
    iterator = iter(batches)
    next(iterator)
    _sync(device)
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    _sync(device)
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shards", required=True, help="a precompute output (URI)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1024], help="rows per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    import torch

    from pipelines.shards import collate_shard_rows
    from trainer.runtime.config import DataSection
    from trainer.runtime.data import LocalReader, open_source

    device = torch.device(args.device)
    reader = LocalReader(open_source(DataSection(uri=args.shards), "shards", None, None), None)

    def collate(rows):
        return collate_shard_rows(rows, device=device)

    started = time.perf_counter()
    decoded = reader.collate_all(collate, limit_mb=1e9)
    _sync(device)
    once_s = time.perf_counter() - started
    rows = reader.table.num_rows
    print(f"{rows} rows on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"decoded once in {once_s:.2f} s\n")
    print("| rows per batch | decode every step (ms) | select from the cache (ms) | decode rows/s | select rows/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        count = min(args.batches, rows // batch - 1)
        if count < 1:
            print(f"| {batch} | (fewer than two batches of rows) | | | |")
            continue
        per_step = time_batches((collate(r) for r in reader.batches(batch, 0, 0)), device, count)
        cached = time_batches((decoded.select(i) for i in reader.epoch_indices(batch, 0, 0)), device, count)
        print(f"| {batch} | {per_step * 1e3:.1f} | {cached * 1e3:.2f} | {batch / per_step:,.0f} | "
              f"{batch / cached:,.0f} |")


if __name__ == "__main__":
    main()
