# Terraform and provider versions. `terraform init` writes .terraform.lock.hcl with the exact
# provider builds: commit it, so every apply uses the same ones.
terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.30"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.36"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

# The helm and kubernetes providers talk to the cluster this configuration creates, with the
# caller's own Google credentials (no static kubeconfig, nothing long-lived in the state).
data "google_client_config" "current" {}

locals {
  cluster_host = "https://${google_container_cluster.atelier.endpoint}"
  cluster_ca   = base64decode(google_container_cluster.atelier.master_auth[0].cluster_ca_certificate)
}

provider "kubernetes" {
  host                   = local.cluster_host
  token                  = data.google_client_config.current.access_token
  cluster_ca_certificate = local.cluster_ca
}

provider "helm" {
  kubernetes = {
    host                   = local.cluster_host
    token                  = data.google_client_config.current.access_token
    cluster_ca_certificate = local.cluster_ca
  }
}
