"""The tasks, each implementing the engine's task contract (``seg.engine.task``): ``semantic``
(a class per pixel) and ``instance`` (a mask per object)."""
