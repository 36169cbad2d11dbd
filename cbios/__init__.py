"""CBIOS toolkit: builds the bootable firmware of a cluster node from YAML profiles."""

__version__ = "0.1.0"
