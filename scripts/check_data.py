"""python scripts/check_data.py data=<name> data.root=<dir>: the dataset doctor (docs/datasets.md)."""

from seg.doctor import main

if __name__ == "__main__":
    main()
