{{/* Names: every resource is <fullname>[-suffix]; 40 characters leave room for KubeRay's
     suffixes (the RayCluster `<name>-<5>`, its services `-head-svc`, `-serve-svc`). */}}
{{- define "atelier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "atelier.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "atelier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atelier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "atelier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "atelier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "atelier.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* The enabled pools, in the table's order, as a JSON list (fromJsonArray to use it). */}}
{{- define "atelier.enabledPools" -}}
{{- $names := list }}
{{- range $name, $pool := .Values.pools }}
{{- if $pool.enabled }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{- define "atelier.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "atelier.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "atelier.s3Secret" -}}
{{- if .Values.storage.credentials.create }}
{{- printf "%s-s3" (include "atelier.fullname" .) }}
{{- else }}
{{- required "storage.credentials.existingSecret: name the Secret with the S3 keys, or set storage.credentials.create" .Values.storage.credentials.existingSecret }}
{{- end }}
{{- end }}

{{- define "atelier.apiKeysSecret" -}}
{{- if .Values.apiKeys.create }}
{{- printf "%s-api-keys" (include "atelier.fullname" .) }}
{{- else }}
{{- .Values.apiKeys.existingSecret }}
{{- end }}
{{- end }}

{{- define "atelier.settingsConfigMap" -}}
{{- printf "%s-settings" (include "atelier.fullname" .) }}
{{- end }}

{{- define "atelier.rayServiceAccount" -}}
{{- printf "%s-ray" (include "atelier.fullname" .) }}
{{- end }}

{{- define "atelier.submitterServiceAccount" -}}
{{- default (printf "%s-submitter" (include "atelier.fullname" .)) .Values.training.serviceAccount.name }}
{{- end }}

{{/* The application on a pool: the ServeConfig of the values with the pool set, and a name and a
     route of its own. atelier.kube.chart.application is the same rule in Python. */}}
{{- define "atelier.routePrefix" -}}
{{- printf "%s/%s" (trimSuffix "/" .serve.route_prefix) .pool }}
{{- end }}

{{/* serveConfigV2: what `atelier serve config` writes for the same ServeConfig (a test compares
     them), with one application per enabled pool. */}}
{{- define "atelier.serveConfigV2" -}}
{{- $serve := .Values.serve }}
{{- $env := dict "ATELIER_HOME" "/var/lib/atelier" "ATELIER_S3__BUCKET" .Values.storage.bucket "ATELIER_S3__REGION" .Values.storage.region }}
{{- with .Values.storage.endpoint }}{{ $_ := set $env "ATELIER_S3__ENDPOINT" . }}{{ end }}
{{- $applications := list }}
{{- range $pool := include "atelier.enabledPools" . | fromJsonArray }}
{{- $args := deepCopy $serve }}
{{- $_ := set $args "gpu" $pool }}
{{- $_ := set $args "name" (printf "%s-%s" $serve.name $pool) }}
{{- $_ := set $args "route_prefix" (include "atelier.routePrefix" (dict "serve" $serve "pool" $pool)) }}
{{- $applications = append $applications (dict "name" $args.name "route_prefix" $args.route_prefix "import_path" "atelier_serve.app:build" "runtime_env" (dict "env_vars" $env) "args" $args) }}
{{- end }}
{{- $http := dict "host" "0.0.0.0" "port" $serve.http.port "request_timeout_s" $serve.http.request_timeout_s }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" $applications) }}
{{- end }}

{{/* The container fields every Ray container shares: image, environment, security. */}}
{{- define "atelier.rayContainer" -}}
image: {{ include "atelier.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: ATELIER_HOME
    value: /var/lib/atelier
envFrom:
  - configMapRef:
      name: {{ include "atelier.settingsConfigMap" . }}
  - secretRef:
      name: {{ include "atelier.s3Secret" . }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - name: atelier-home
    mountPath: /var/lib/atelier
  - name: tmp
    mountPath: /tmp
  - name: dshm
    mountPath: /dev/shm
  {{- if include "atelier.apiKeysSecret" . }}
  - name: api-keys
    mountPath: /etc/atelier
    readOnly: true
  {{- end }}
{{- end }}

{{- define "atelier.rayPodSpec" -}}
serviceAccountName: {{ include "atelier.rayServiceAccount" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
volumes:
  - name: atelier-home
    emptyDir: {}
  - name: tmp
    emptyDir: {}
  # Ray's object store lives in shared memory; a container's default /dev/shm is 64 MiB.
  - name: dshm
    emptyDir:
      medium: Memory
  {{- if include "atelier.apiKeysSecret" . }}
  - name: api-keys
    secret:
      secretName: {{ include "atelier.apiKeysSecret" . }}
      items:
        - key: {{ .Values.apiKeys.secretKey }}
          path: api-keys
  {{- end }}
{{- end }}

{{- define "atelier.podMetadata" -}}
labels:
  {{- include "atelier.selectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .pool }}
  atelier.dev/gpu: {{ . }}
  {{- end }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
