# Node pools: one per pool of atelier.pools (platform/atelier/pools.py), which the chart's worker
# groups and the training RayJobs select by GKE's accelerator label and tolerate by the GPU taint.
# tests/test_infra.py checks these against atelier.pools, so the two cannot drift.
#
#   cpu   the system pool: no accelerator, no taint (the operator, the Ray head, cpu workers)
#   t4    one NVIDIA T4 per node, from zero
#   a100  one NVIDIA A100 40 GB per node, from zero
locals {
  # GKE labels every GPU node `cloud.google.com/gke-accelerator: <accelerator>` itself (the label
  # is reserved, so it is not set here): `accelerator` is atelier.pools' NodePool.accelerator.
  gpu_pools = {
    t4 = {
      machine_type = "n1-standard-8"
      accelerator  = "nvidia-tesla-t4"
      max_nodes    = var.t4_max_nodes
    }
    a100 = {
      machine_type = "a2-highgpu-1g"
      accelerator  = "nvidia-tesla-a100"
      max_nodes    = var.a100_max_nodes
    }
  }
}

resource "google_container_node_pool" "system" {
  name     = "cpu"
  cluster  = google_container_cluster.atelier.id
  location = var.location

  autoscaling {
    total_min_node_count = var.system_min_nodes
    total_max_node_count = var.system_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = 100
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    labels = {
      "atelier.dev/pool" = "cpu"
    }

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

resource "google_container_node_pool" "gpu" {
  for_each = { for name, pool in local.gpu_pools : name => pool if pool.max_nodes > 0 }

  name           = each.key
  cluster        = google_container_cluster.atelier.id
  location       = var.location
  node_locations = length(var.gpu_zones) > 0 ? var.gpu_zones : null

  # From zero: a GPU node exists only while a Ray worker pod asks for its GPU.
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = each.value.max_nodes
    location_policy      = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = each.value.machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = 200 # the CUDA image (~10 GB) and the model cache
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    spot            = var.gpu_spot

    guest_accelerator {
      type  = each.value.accelerator
      count = 1
      # GKE installs the NVIDIA driver itself (no driver DaemonSet to apply).
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    labels = {
      "atelier.dev/pool" = each.key
    }

    # GKE adds this taint to GPU nodes by itself; declaring it keeps the plan honest about what
    # the chart's GPU toleration (atelier.pools.GPU_TOLERATION, operator Exists) tolerates.
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

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
