{{/* Names, labels and control-plane addresses shared by every template of the chart. */}}

{{/* Name of every node-side object; `ztunnel` as in Istio (istiod trusts istio-system/ztunnel). */}}
{{- define "ztunnel.name" -}}
{{- default "ztunnel" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ztunnel.labels" -}}
app.kubernetes.io/name: {{ include "ztunnel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* DaemonSet selector (immutable once installed); same as Istio's ztunnel. */}}
{{- define "ztunnel.selectorLabels" -}}
app: {{ include "ztunnel.name" . }}
{{- end -}}

{{- define "ztunnel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ztunnel.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ztunnel.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The controller's Deployment, Service, ServiceAccount and RBAC: `<name>-controller`. */}}
{{- define "ztunnel.controllerName" -}}
{{- printf "%s-controller" (include "ztunnel.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ztunnel.controllerSelectorLabels" -}}
app: {{ include "ztunnel.controllerName" . }}
{{- end -}}

{{/* The controller's config dir: the rendered ConfigMap, or the one named in the values. */}}
{{- define "ztunnel.controllerConfigMap" -}}
{{- default (printf "%s-config" (include "ztunnel.controllerName" .)) .Values.controlPlane.builtin.configMap -}}
{{- end -}}

{{/* True (non-empty) when the chart installs its own controller; fails on an unknown mode. */}}
{{- define "ztunnel.builtin" -}}
{{- $mode := .Values.controlPlane.mode -}}
{{- if not (has $mode (list "builtin" "istiod")) -}}
{{- fail (printf "controlPlane.mode must be builtin or istiod, not %q" $mode) -}}
{{- end -}}
{{- if eq $mode "builtin" -}}true{{- end -}}
{{- end -}}

{{/* XDS_ADDRESS: our controller's Service, or istiod. */}}
{{- define "ztunnel.xdsAddress" -}}
{{- if include "ztunnel.builtin" . -}}
{{- printf "https://%s.%s.svc:15012" (include "ztunnel.controllerName" .) .Release.Namespace -}}
{{- else -}}
{{- required "controlPlane.istiod.xdsAddress is required in istiod mode" .Values.controlPlane.istiod.xdsAddress -}}
{{- end -}}
{{- end -}}

{{/* CA_ADDRESS: the controller serves the CA on the same port as xDS, as istiod does. */}}
{{- define "ztunnel.caAddress" -}}
{{- if include "ztunnel.builtin" . -}}
{{- include "ztunnel.xdsAddress" . -}}
{{- else -}}
{{- required "controlPlane.istiod.caAddress is required in istiod mode" .Values.controlPlane.istiod.caAddress -}}
{{- end -}}
{{- end -}}

{{/*
How both agents reach the control plane, with Istio's env names: delta ADS at XDS_ADDRESS
over TLS checked against XDS_ROOT_CA, authenticated with a projected service-account token
for audience istio-ca (AUTH_TOKEN), as this node (NODE_NAME) of CLUSTER_ID.
*/}}
{{- define "ztunnel.xdsEnv" -}}
- name: XDS_ADDRESS
  value: {{ include "ztunnel.xdsAddress" . | quote }}
- name: XDS_ROOT_CA
  value: /var/run/secrets/istio/root-cert.pem
- name: AUTH_TOKEN
  value: /var/run/secrets/tokens/istio-token
{{- if include "ztunnel.builtin" . }}
# The controller's serving certificate names istiod.istio-system.svc, not its Service.
- name: ZTUNNEL_CONTROL_PLANE_SERVER_NAME
  value: istiod.istio-system.svc
{{- end }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: CLUSTER_ID
  value: {{ .Values.clusterId | quote }}
{{- end -}}

{{/* The control plane's root certificate and the istio-ca token, where xdsEnv says. */}}
{{- define "ztunnel.controlPlaneMounts" -}}
- name: istiod-ca-cert
  mountPath: /var/run/secrets/istio
  readOnly: true
- name: istio-token
  mountPath: /var/run/secrets/tokens
  readOnly: true
{{- end -}}

{{/*
The root: only root-cert.pem of the controller's CA Secret (never its key), or the ConfigMap
istiod publishes in every namespace. The token: bound to this pod, audience istio-ca,
rotated by the kubelet (the agents re-read it on every connection).
*/}}
{{- define "ztunnel.controlPlaneVolumes" -}}
- name: istiod-ca-cert
{{- if include "ztunnel.builtin" . }}
  secret:
    secretName: {{ required "controlPlane.builtin.caSecret is required in builtin mode" .Values.controlPlane.builtin.caSecret }}
    items:
      - key: root-cert.pem
        path: root-cert.pem
{{- else }}
  configMap:
    name: {{ required "controlPlane.istiod.rootCertConfigMap is required in istiod mode" .Values.controlPlane.istiod.rootCertConfigMap }}
{{- end }}
- name: istio-token
  projected:
    sources:
      - serviceAccountToken:
          path: istio-token
          audience: istio-ca
          expirationSeconds: 43200
{{- end -}}

{{/*
`ztunnel node` flags, shared by the DaemonSet and the uninstall Job so `--uninstall` finds
exactly what the agent installed. The cgroup v2 root is the host's, mounted at
/host/sys/fs/cgroup: the container's own /sys/fs/cgroup is its cgroup namespace.
*/}}
{{- define "ztunnel.nodeArgs" -}}
- node
- "--inpod-uds=/var/run/ztunnel/ztunnel.sock"
- "--state-dir=/var/run/ztunnel/pods"
- "--handoff-socket=/var/run/ztunnel/handoff.sock"
- "--pin-dir=/sys/fs/bpf/ztunnel"
- "--cgroup=/host/sys/fs/cgroup"
- "--admin-addr=127.0.0.1:15000"
- "--metrics-addr=[::]:15020"
- "--readiness-addr=[::]:15021"
{{- range .Values.capture.probeSources }}
- "--probe-source={{ . }}"
{{- end }}
{{- range .Values.capture.excludeOutboundPorts }}
- "--exclude-outbound-port={{ . }}"
{{- end }}
{{- range .Values.capture.excludeInboundPorts }}
- "--exclude-inbound-port={{ . }}"
{{- end }}
{{- range .Values.capture.excludeCIDRs }}
- "--exclude-cidr={{ . }}"
{{- end }}
{{- end -}}

{{/* The node agent's privileges (also the uninstall Job's: it detaches the same links). */}}
{{- define "ztunnel.nodeSecurityContext" -}}
# Not privileged; every capability dropped but the two it was measured to need
# (tests/tests/deploy.rs runs the agent with exactly these, and with each one removed):
#  SYS_ADMIN - setns(2) into each pod's network namespace to open its listeners there;
#              also what bpf(2) accepts for CAP_BPF and, for the verifier's privileged
#              mode the capture programs need, for CAP_PERFMON.
#  NET_ADMIN - SO_MARK 0x539 on the proxy's sockets (without it no listener opens).
# Kubernetes refuses allowPrivilegeEscalation=false together with SYS_ADMIN.
privileged: false
allowPrivilegeEscalation: true
readOnlyRootFilesystem: true
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
capabilities:
  drop:
    - ALL
  add:
    - NET_ADMIN
    - SYS_ADMIN
{{- end -}}
