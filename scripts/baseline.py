"""python scripts/baseline.py method=otsu|kmeans data=<name> [split=val]: classical baselines
scored like evaluate.py (docs/evaluate.md)."""

from seg.baseline import main

if __name__ == "__main__":
    main()
