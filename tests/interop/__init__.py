"""Interop tests: third-party gRPC tools and stacks against a real node process."""
