"""python train.py [group=option ...] [key=value ...]: see README.md and configs/train.yaml."""

from seg.train import main

if __name__ == "__main__":
    main()
