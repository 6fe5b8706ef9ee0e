"""Datasets: registry-package preparation into plain on-disk formats, and their loaders."""
