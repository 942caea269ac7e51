"""python predict.py checkpoint=<path> input=<file|dir|glob> output=<dir>: see README.md."""

from seg.predict import main

if __name__ == "__main__":
    main()
