"""Cost of the Great Expectations suite relative to the plain loader checks it adds to.

On ~1000 Pick-a-Pic-schema rows (the tiny set repeated), times
``validate_preference_rows`` (decoding every image + the GX suite) against
``prepare_pairs`` (label filtering and winner-first pairs, what training needs
anyway), in interleaved repeats; prints median seconds and the ratio.

    python benchmarks/validation_time.py [--repeats 5] [--copies 21]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402

from alignment.config import ValidationConfig  # noqa: E402
from alignment.data import load_preference_frame, prepare_pairs  # noqa: E402
from alignment.validation import validate_preference_rows  # noqa: E402

OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=21, help="copies of the 48-row tiny set")
    args = parser.parse_args()
    tiny = load_preference_frame(REPO_ROOT / "data" / "tiny_pickapic", split="train")
    frame = pd.concat([tiny] * args.copies, ignore_index=True)
    frame["caption"] = [f"{caption} #{i}" for i, caption in enumerate(frame["caption"])]
    frame["row_id"] = [str(i) for i in range(len(frame))]
    validate_preference_rows(frame.head(48), OPTIONS, ValidationConfig())  # imports GX once, untimed

    seconds: dict[str, list[float]] = {"prepare_pairs": [], "validate_preference_rows": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        prepare_pairs(frame, drop_ties=True)
        seconds["prepare_pairs"].append(time.perf_counter() - started)
        started = time.perf_counter()
        validate_preference_rows(frame, OPTIONS, ValidationConfig())
        seconds["validate_preference_rows"].append(time.perf_counter() - started)
    base = statistics.median(seconds["prepare_pairs"])
    print(f"{len(frame)} rows, median of {args.repeats}:")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:26s} {median:7.3f} s   {median / base:6.1f}x prepare_pairs")


if __name__ == "__main__":
    main()
