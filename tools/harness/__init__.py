"""Workspace tooling for the nova orchestration patch series."""
