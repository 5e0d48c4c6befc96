variable "project" {
  description = "Google Cloud project id to create everything in."
  type        = string
}

variable "region" {
  description = "Region of the bucket, the network and the Artifact Registry repository."
  type        = string
  default     = "us-central1"
}

variable "location" {
  description = "Where the cluster runs: a zone (one zonal cluster per billing account is covered by GKE's free tier) or a region (three zones, a replicated control plane, the cluster fee charged)."
  type        = string
  default     = "us-central1-a"
}

variable "gpu_zones" {
  description = "Zones of the GPU node pools (each must offer the pool's GPU). Empty: the cluster's zones."
  type        = list(string)
  default     = []
}

variable "name" {
  description = "Name of the cluster; prefix of the bucket, the service account and the network."
  type        = string
  default     = "atelier"
}

variable "namespace" {
  description = "Kubernetes namespace the chart is installed in (the S3 Secret is created there)."
  type        = string
  default     = "atelier"
}

variable "master_authorized_cidrs" {
  description = "CIDR blocks allowed to reach the cluster's API server (your office or VPN; kubectl, helm and Terraform itself)."
  type        = list(string)
}

variable "system_machine_type" {
  description = "Machine of the CPU system pool: the KubeRay operator, the Ray head (2 CPUs, 8 GiB) and, when the chart's cpu pool is on, its workers (6 CPUs, 24 GiB)."
  type        = string
  default     = "e2-standard-8"
}

variable "system_min_nodes" {
  description = "Fewest nodes of the CPU system pool: the Ray head must run somewhere, so at least 1."
  type        = number
  default     = 1
  validation {
    condition     = var.system_min_nodes >= 1
    error_message = "The system pool needs at least one node for the Ray head and the operator."
  }
}

variable "system_max_nodes" {
  description = "Most nodes of the CPU system pool."
  type        = number
  default     = 3
}

variable "t4_max_nodes" {
  description = "Most T4 nodes (one T4 each); the pool starts at zero. Mind the project's GPU quota."
  type        = number
  default     = 4
}

variable "a100_max_nodes" {
  description = "Most A100 nodes (one A100 40 GB each); the pool starts at zero. 0 leaves the pool out."
  type        = number
  default     = 2
}

variable "gpu_spot" {
  description = "Run the GPU pools on Spot VMs (60-91% cheaper, preemptible): fine for serving replicas that scale, risky for long trainings."
  type        = bool
  default     = false
}

variable "gpu_driver_version" {
  description = "GKE-installed NVIDIA driver: LATEST (needed by CUDA 12.8 images on older GKE versions) or DEFAULT."
  type        = string
  default     = "LATEST"
}

variable "kuberay_chart_version" {
  description = "Version of the kuberay-operator Helm chart (= the KubeRay version). The Atelier chart needs 1.5.1 or later (authOptions); its tests validate against 1.7.0's CRDs."
  type        = string
  default     = "1.7.0"
}

variable "bucket_force_destroy" {
  description = "Let `terraform destroy` delete the bucket with its models and checkpoints in it."
  type        = bool
  default     = false
}
