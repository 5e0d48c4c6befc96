# The KubeRay operator (CRDs and controller), which turns the chart's RayService and the CLI's
# RayJobs into Ray clusters. Pinned: the Atelier chart needs 1.5.1+ (Ray token authOptions) and
# is validated against KubeRay 1.7.0's CRDs.
resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true
  wait             = true

  depends_on = [google_container_node_pool.system]
}

# The namespace the Atelier chart goes into, with Pod Security admission at `restricted` (the
# chart's pods run non-root with all capabilities dropped).
resource "kubernetes_namespace_v1" "atelier" {
  metadata {
    name = var.namespace
    labels = {
      "pod-security.kubernetes.io/enforce" = "restricted"
    }
  }

  depends_on = [google_container_node_pool.system]
}
