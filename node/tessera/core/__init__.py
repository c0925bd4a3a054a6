"""The bottom layer: errors and their gRPC status, page tokens, node paths, small codecs.

Imports nothing of tessera. Its modules are public (`tessera.core.errors`, …).
"""
