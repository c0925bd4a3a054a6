"""Tessera: a gRPC federation node daemon."""

__version__ = "0.1.0"
