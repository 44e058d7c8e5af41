"""FX graph passes that find dequantize -> matmul subgraphs and rewrite them to qcompile ops."""
from .manager import QCompilePass

__all__ = ["QCompilePass"]
