"""The last validation of each run under <runs> (bands13_seed<N>, rgb_seed<N>): val mIoU and
the IoU of the classes the val rows hold, per run and as the mean over seeds, as JSON.

    python docs/results/sentinel2_bands/summarize.py <work>/runs > summary.json
"""

import json
import statistics
import sys
from pathlib import Path

VAL_CLASSES = ["forest", "grassland", "shrubland", "artificial"]  # the val rows' classes


def main(runs: Path) -> None:
    summary = {}
    for run in sorted(runs.iterdir()):
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        summary.setdefault(run.name.rsplit("_seed", 1)[0], {})[run.name] = {
            "iteration": last["iteration"],
            "mIoU": last["mIoU"],
            **{name: last["IoU"][name] for name in VAL_CLASSES},
        }
    for seeds in summary.values():
        keys = ["mIoU", *VAL_CLASSES]
        seeds["mean_over_seeds"] = {
            key: statistics.mean(run[key] for run in seeds.values()) for key in keys
        }
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
