{{/* 47 characters: KubeRay refuses longer RayService names (it derives longer ones). */}}
{{- define "nibble.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "nibble.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* GPUs per worker pod: given (at least the largest tensor_parallel_size: a replica's ranks
are packed into one pod), or that size. */}}
{{- define "nibble.gpusPerWorker" -}}
{{- $max := 1 -}}
{{- range .Values.models -}}
{{- $tp := int (default 1 .tensor_parallel_size) -}}
{{- if gt $tp $max }}{{ $max = $tp }}{{ end -}}
{{- end -}}
{{- with .Values.gpuWorkers.gpusPerWorker -}}
{{- if lt (int .) $max -}}
{{- fail (printf "gpuWorkers.gpusPerWorker (%d) is less than the largest tensor_parallel_size (%d): a replica's ranks must fit in one pod" (int .) $max) -}}
{{- end -}}
{{- . -}}
{{- else -}}
{{- $max -}}
{{- end -}}
{{- end -}}

{{/* The Serve config: the same schema as configs/*.yaml. */}}
{{- define "nibble.serveConfig" -}}
{{- /* Models run on the GPU workers (device cuda unless a model names its own): chosen from
what the cluster holds as a replica starts, they would land on the head's CPUs while the GPU
pods are still coming up. */ -}}
{{- $models := list -}}
{{- range .Values.models -}}
{{- $models = append $models (merge (deepCopy .) (dict "device" "cuda")) -}}
{{- end -}}
{{- $args := dict "models" $models -}}
{{- if .Values.apiKeys.secretName }}{{ $_ := set $args "api_keys_env" "NIBBLE_API_KEYS" }}{{ end -}}
applications:
  - name: nibble
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      {{- toYaml $args | nindent 6 }}
{{- end -}}

{{- define "nibble.env" -}}
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath }}/hub
{{- if .Values.apiKeys.secretName }}
- name: NIBBLE_API_KEYS
  valueFrom:
    secretKeyRef: {name: {{ .Values.apiKeys.secretName }}, key: {{ .Values.apiKeys.secretKey }}}
{{- end }}
{{- if .Values.hfToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.hfToken.secretName }}, key: {{ .Values.hfToken.secretKey }}}
{{- end }}
{{- end -}}

{{- define "nibble.volume" -}}
- name: model-cache
{{- if eq .Values.modelCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "nibble.fullname" .)) .Values.modelCache.pvc.existingClaim }}
{{- else if eq .Values.modelCache.type "hostPath" }}
  hostPath: {path: {{ .Values.modelCache.hostPath.path }}, type: DirectoryOrCreate}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "nibble.container" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  {{- include "nibble.env" . | nindent 2 }}
volumeMounts:
  - name: model-cache
    mountPath: {{ .Values.modelCache.mountPath }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}
