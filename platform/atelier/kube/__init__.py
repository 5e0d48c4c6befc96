"""The Kubernetes seam: training runs as KubeRay RayJobs, the endpoint as the chart's RayService.
`render` writes a RayJob, `api` is the one door to the cluster's API, `submit` puts them together,
`serving` reads the RayService's status."""

from atelier.kube.render import rayjob_name, render_rayjob
from atelier.kube.serving import rayservice_status
from atelier.kube.submit import rayjob_status, submit_rayjob

__all__ = ["rayjob_name", "rayjob_status", "rayservice_status", "render_rayjob", "submit_rayjob"]
