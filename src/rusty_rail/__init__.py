"""Rusty Rail: a Maglev-style L4 load balancer for GRE-encapsulated traffic."""

__version__ = "0.1.0"
