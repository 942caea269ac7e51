"""python evaluate.py checkpoint=<path> [split=val] [out=metrics.json]: see README.md."""

from seg.evaluate import main

if __name__ == "__main__":
    main()
