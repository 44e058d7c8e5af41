"""Custom ops that launch qcompile's kernels (``ops``, imported to register them), and device
queries (``device``)."""
