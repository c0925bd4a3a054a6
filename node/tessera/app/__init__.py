"""The one place a node is built, run and stopped (the composition root)."""

from tessera.app._node import SERVICE_NAMES, Node, provision_dev_certificates, serve, start_node

__all__ = ["SERVICE_NAMES", "Node", "provision_dev_certificates", "serve", "start_node"]
