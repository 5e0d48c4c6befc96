# The bucket of models, checkpoints and datasets, reached through GCS's S3-compatible XML API with
# an HMAC key of a service account that may use this bucket and nothing else.
resource "google_storage_bucket" "atelier" {
  #checkov:skip=CKV_GCP_62:Access logs would go to a second bucket this configuration does not own; Cloud Audit Logs (Data Access) cover who read what when enabled on the project.
  name                        = "${var.project}-${var.name}"
  location                    = upper(var.region)
  force_destroy               = var.bucket_force_destroy
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Registry versions are immutable by design; object versioning protects against a mistaken
  # overwrite or delete, and old versions go after 30 days.
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }

  labels = {
    app = "atelier"
  }
}

resource "google_service_account" "storage" {
  account_id   = "${var.name}-storage"
  display_name = "Atelier S3 access (HMAC) to its bucket only"
}

# Scoped to the bucket: the binding is on the bucket, not the project.
resource "google_storage_bucket_iam_member" "storage" {
  bucket = google_storage_bucket.atelier.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.storage.email}"
}

resource "google_storage_hmac_key" "storage" {
  service_account_email = google_service_account.storage.email
}

# The Secret the chart reads by default (storage.credentials.existingSecret: atelier-s3). The key
# is in the Terraform state as well: keep the state in a private, encrypted backend.
resource "kubernetes_secret_v1" "s3" {
  metadata {
    name      = "atelier-s3"
    namespace = kubernetes_namespace_v1.atelier.metadata[0].name
  }
  data = {
    AWS_ACCESS_KEY_ID     = google_storage_hmac_key.storage.access_id
    AWS_SECRET_ACCESS_KEY = google_storage_hmac_key.storage.secret
  }
}

# Where `docker push` puts the image (docker/README.md).
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Customer-managed encryption keys need a KMS key ring this configuration does not create; Google-managed encryption is on.
  repository_id = var.name
  location      = var.region
  format        = "DOCKER"
  labels = {
    app = "atelier"
  }
}
