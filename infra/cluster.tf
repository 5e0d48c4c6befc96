# The GKE Standard cluster. Its node pools are in node_pools.tf; the default pool is removed so
# that every node belongs to a pool this configuration describes.
locals {
  # "us-central1-a" -> "us-central1"; a region stays itself.
  cluster_region = length(split("-", var.location)) == 3 ? join("-", slice(split("-", var.location), 0, 2)) : var.location
}

resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "Atelier GKE nodes (logs, metrics, image pulls; no data access)"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/artifactregistry.reader",
  ])
  project = var.project
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "atelier" {
  #checkov:skip=CKV_GCP_66:Binary Authorization needs an attestor and a signing pipeline for the image; enable it with your release process (infra/README.md, Hardening).
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Workspace domain with a gke-security-groups group; set authenticator_groups_config when you have one.
  #checkov:skip=CKV_GCP_12:Dataplane V2 (datapath_provider ADVANCED_DATAPATH) enforces NetworkPolicy itself; the network_policy block is for the Calico add-on and conflicts with it.
  #checkov:skip=CKV_GCP_24:PodSecurityPolicy was removed in Kubernetes 1.25; the namespace uses Pod Security admission (restricted) instead.
  name     = var.name
  location = var.location

  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  network    = google_compute_network.atelier.id
  subnetwork = google_compute_subnetwork.nodes.id
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  release_channel {
    channel = "REGULAR"
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.0/28"
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block   = cidr_blocks.value
        display_name = "authorized"
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  workload_identity_config {
    workload_pool = "${var.project}.svc.id.goog"
  }

  # Dataplane V2 enforces the chart's optional NetworkPolicy.
  datapath_provider = "ADVANCED_DATAPATH"

  enable_intranode_visibility = true
  enable_shielded_nodes       = true
  enable_legacy_abac          = false

  # The cluster autoscaler adds GPU nodes when a Ray worker pod is pending and removes them when
  # idle; "optimize-utilization" removes idle nodes sooner, which is what a GPU bill wants.
  cluster_autoscaling {
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }

  resource_labels = {
    app = "atelier"
  }

  # Nodes of the (removed) default pool still get a hardened config while they exist.
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
  }
}
