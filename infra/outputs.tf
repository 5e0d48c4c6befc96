# What the Atelier chart's values need (and `terraform output -raw chart_values` writes them).
output "cluster_name" {
  description = "GKE cluster; `gcloud container clusters get-credentials` takes it."
  value       = google_container_cluster.atelier.name
}

output "cluster_location" {
  description = "The cluster's zone or region."
  value       = google_container_cluster.atelier.location
}

output "bucket" {
  description = "storage.bucket of the chart."
  value       = google_storage_bucket.atelier.name
}

output "s3_endpoint" {
  description = "storage.endpoint of the chart: GCS's S3-compatible XML API."
  value       = "https://storage.googleapis.com"
}

output "s3_region" {
  description = "storage.region of the chart: GCS takes `auto` for SigV4 signing."
  value       = "auto"
}

output "s3_secret_name" {
  description = "storage.credentials.existingSecret of the chart: the Secret holding the HMAC key."
  value       = kubernetes_secret_v1.s3.metadata[0].name
}

output "namespace" {
  description = "Namespace to `helm install` the chart into."
  value       = kubernetes_namespace_v1.atelier.metadata[0].name
}

output "image_repository" {
  description = "image.repository of the chart, in this project's Artifact Registry."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}/atelier"
}

output "gpu_pools" {
  description = "GPU pools created (the chart's pools.<name>.enabled may be true only for these)."
  value       = keys(google_container_node_pool.gpu)
}

output "chart_values" {
  description = "A values file for `helm install atelier charts/atelier -f -`."
  value = yamlencode({
    image = {
      repository = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}/atelier"
    }
    storage = {
      endpoint    = "https://storage.googleapis.com"
      region      = "auto"
      bucket      = google_storage_bucket.atelier.name
      credentials = { existingSecret = kubernetes_secret_v1.s3.metadata[0].name }
    }
    pools = { for name in ["t4", "a100"] : name => { enabled = contains(keys(google_container_node_pool.gpu), name) } }
  })
}
