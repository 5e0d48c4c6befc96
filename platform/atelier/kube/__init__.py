"""The Kubernetes seam: training runs as KubeRay RayJobs. `render` writes the manifest, `api` is
the one door to the cluster's API, `submit` puts them together."""

from atelier.kube.render import rayjob_name, render_rayjob
from atelier.kube.submit import rayjob_status, submit_rayjob

__all__ = ["rayjob_name", "rayjob_status", "render_rayjob", "submit_rayjob"]
