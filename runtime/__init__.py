"""Custom ops that launch qcompile's kernels, and device queries."""
from . import ops  # registers the qcompile:: ops
