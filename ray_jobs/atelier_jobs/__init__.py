"""Entrypoints that run inside the Ray cluster, submitted as Ray jobs by the control plane."""
