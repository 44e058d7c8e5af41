"""Triton kernel templates and the tiling / shared-memory model that configures them."""
