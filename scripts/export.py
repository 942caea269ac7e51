"""python scripts/export.py checkpoint=<path> format=onnx|torchscript: see docs/evaluate.md ("Export")."""

from seg.export import main

if __name__ == "__main__":
    main()
