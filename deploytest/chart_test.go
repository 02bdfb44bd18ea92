// Package deploytest checks what peermirror ships besides its code: the
// Helm chart in charts/peermirror, rendered by a real helm and decoded
// strictly into the Kubernetes API types, and the xcaddy build that
// xcaddy.Dockerfile runs.
package deploytest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/peermirror/peermirror/internal/testenv"
)

// serviceMonitor holds the fields of the Prometheus operator's
// ServiceMonitor (monitoring.coreos.com/v1) that the chart sets; decoding
// is strict, so a misspelt or unknown field fails.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// rendered is a chart rendered with one set of values, decoded.
type rendered struct {
	serviceAccounts []corev1.ServiceAccount
	configMap       *corev1.ConfigMap
	service         *corev1.Service
	daemonSet       *appsv1.DaemonSet
	role            *rbacv1.Role
	roleBinding     *rbacv1.RoleBinding
	job             *batchv1.Job
	networkPolicy   *networkingv1.NetworkPolicy
	serviceMonitor  *serviceMonitor
	kinds           []string
}

var docSeparator = regexp.MustCompile(`(?m)^---\s*$`)

// decodeStrict decodes one YAML document into out, refusing duplicate and
// unknown fields.
func decodeStrict[T any](t *testing.T, doc string) *T {
	t.Helper()
	out := new(T)
	if err := yaml.UnmarshalStrict([]byte(doc), out); err != nil {
		t.Fatalf("decoding strictly into %T: %v\n%s", out, err, doc)
	}
	return out
}

// render runs helm template and decodes every object by its kind.
func render(t *testing.T, helm string, args ...string) rendered {
	t.Helper()
	chart := filepath.Join(testenv.RepoRoot(t), "charts", "peermirror")
	full := append([]string{"template", "pm", chart, "--namespace", "kube-system"}, args...)
	out, err := exec.Command(helm, full...).CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	var r rendered
	for _, doc := range docSeparator.Split(string(out), -1) {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("reading a rendered document: %v\n%s", err, doc)
		}
		if head.Kind == "" {
			if strings.TrimSpace(stripComments(doc)) != "" {
				t.Fatalf("a rendered document without kind:\n%s", doc)
			}
			continue
		}
		r.kinds = append(r.kinds, head.Kind)
		switch head.Kind {
		case "ServiceAccount":
			r.serviceAccounts = append(r.serviceAccounts, *decodeStrict[corev1.ServiceAccount](t, doc))
		case "ConfigMap":
			r.configMap = decodeStrict[corev1.ConfigMap](t, doc)
		case "Service":
			r.service = decodeStrict[corev1.Service](t, doc)
		case "DaemonSet":
			r.daemonSet = decodeStrict[appsv1.DaemonSet](t, doc)
		case "Role":
			r.role = decodeStrict[rbacv1.Role](t, doc)
		case "RoleBinding":
			r.roleBinding = decodeStrict[rbacv1.RoleBinding](t, doc)
		case "Job":
			r.job = decodeStrict[batchv1.Job](t, doc)
		case "NetworkPolicy":
			r.networkPolicy = decodeStrict[networkingv1.NetworkPolicy](t, doc)
		case "ServiceMonitor":
			if head.APIVersion != "monitoring.coreos.com/v1" {
				t.Errorf("ServiceMonitor apiVersion %q", head.APIVersion)
			}
			r.serviceMonitor = decodeStrict[serviceMonitor](t, doc)
		default:
			t.Fatalf("unexpected kind %s", head.Kind)
		}
	}
	slices.Sort(r.kinds)
	return r
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// valueCase is one set of values the chart is rendered with.
type valueCase struct {
	name  string
	args  []string
	kinds []string
	// registries written into hosts.toml; tolerated taint keys
	registries  []string
	tolerations []string
	// the hostPath volumes mounted writable, and whether the hook exists
	writable []string
	hook     bool
	check    func(t *testing.T, r rendered)
}

var defaultKinds = []string{"ConfigMap", "DaemonSet", "Job", "Role", "RoleBinding", "Service", "ServiceAccount", "ServiceAccount"}

var defaultRegistries = []string{"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "mcr.microsoft.com", "public.ecr.aws"}

func valueCases(repo string) []valueCase {
	return []valueCase{
		{
			name:       "default",
			kinds:      defaultKinds,
			registries: defaultRegistries,
			writable:   []string{"containerd-certs", "state"},
			hook:       true,
			check: func(t *testing.T, r rendered) {
				if strings.Contains(r.configMap.Data["Caddyfile"], "peermirror_debug") {
					t.Errorf("the debug page is on by default")
				}
			},
		},
		{
			name:        "gpu",
			args:        []string{"-f", filepath.Join(repo, "charts/peermirror/values-gpu.yaml")},
			kinds:       defaultKinds,
			registries:  append(slices.Clone(defaultRegistries), "nvcr.io"),
			tolerations: []string{"nvidia.com/gpu", "amd.com/gpu", "sku"},
			writable:    []string{"containerd-certs", "state"},
			hook:        true,
			check: func(t *testing.T, r rendered) {
				// the hook must be able to run in a cluster of GPU nodes only
				var keys []string
				for _, tol := range r.job.Spec.Template.Spec.Tolerations {
					keys = append(keys, tol.Key)
				}
				if !slices.Contains(keys, "nvidia.com/gpu") {
					t.Errorf("uninstall Job tolerations %v lack nvidia.com/gpu", keys)
				}
			},
		},
		{
			name: "peer TLS",
			args: []string{"--set", "peerTLS.enabled=true,peerTLS.secretName=pm-peer",
				"--set", "metrics.serviceMonitor.enabled=true"},
			kinds:      append(slices.Clone(defaultKinds), "ServiceMonitor"),
			registries: defaultRegistries,
			writable:   []string{"containerd-certs", "state"},
			hook:       true,
			check: func(t *testing.T, r rendered) {
				caddyfile := r.configMap.Data["Caddyfile"]
				for _, want := range []string{
					":30020 {\n\t# this node's containerd only\n\tbind 127.0.0.1\n",
					"https://:30021 {", "mode require_and_verify", "trust_pool file /etc/peermirror/peer-tls/ca.crt",
					"strict_sni_host insecure_off", "peers_only", "mirror_port 30021", "bootstrap_port 30022", ":30022 {",
					"cert /etc/peermirror/peer-tls/tls.crt"} {
					if !strings.Contains(caddyfile, want) {
						t.Errorf("Caddyfile lacks %q:\n%s", want, caddyfile)
					}
				}
				c := r.daemonSet.Spec.Template.Spec.Containers[0]
				if c.ReadinessProbe.HTTPGet.Port.StrVal != "ops" || c.LivenessProbe.HTTPGet.Port.StrVal != "ops" {
					t.Errorf("probes on %v and %v, want the ops port", c.ReadinessProbe.HTTPGet.Port, c.LivenessProbe.HTTPGet.Port)
				}
				if m, ok := mountsByName(c.VolumeMounts)["peer-tls"]; !ok || !m.ReadOnly {
					t.Errorf("peer-tls mount %+v", m)
				}
				if r.serviceMonitor.Spec.Endpoints[0].Port != "ops" {
					t.Errorf("ServiceMonitor scrapes %q, want ops", r.serviceMonitor.Spec.Endpoints[0].Port)
				}
			},
		},
		{
			name: "everything on",
			args: []string{
				"--set", "mirrorAllRegistries=true",
				"--set", "tls.enabled=true,tls.secretName=pm-tls",
				"--set", "metrics.serviceMonitor.enabled=true",
				"--set", "networkPolicy.enabled=true,networkPolicy.from[0].ipBlock.cidr=10.0.0.0/16",
				"--set", "p2p.keySecret=pm-keys",
				"--set", "containerd.keepExisting=true,containerd.failOnConfigError=true,containerd.resolveTags=false",
				"--set", "containerd.upstreams.docker\\.io=https://proxy.internal",
				"--set", "containerd.mirrorTargets={http://127.0.0.1:30020,fd00::5}",
				"--set", "peermirror.filterReferences={:latest$}",
				"--set", "p2p.recordTTL=20m,p2p.reprovideInterval=5m",
				"--set", "debugPage.port=30023",
			},
			kinds:      append(slices.Clone(defaultKinds), "NetworkPolicy", "ServiceMonitor"),
			registries: []string{"_default"},
			writable:   []string{"containerd-certs"},
			hook:       true,
			check: func(t *testing.T, r rendered) {
				args := r.daemonSet.Spec.Template.Spec.InitContainers[0].Args
				for _, want := range []string{"--keep-existing", "--fail-on-error", "--no-resolve",
					"--upstream=docker.io=https://proxy.internal", "--mirror=fd00::5"} {
					if !slices.Contains(args, want) {
						t.Errorf("init args %q lack %s", args, want)
					}
				}
				sm := r.serviceMonitor
				if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "mirror" || sm.Spec.Endpoints[0].Path != "/metrics" {
					t.Errorf("ServiceMonitor endpoints %+v", sm.Spec.Endpoints)
				}
				if !selects(sm.Spec.Selector.MatchLabels, r.service.Labels) {
					t.Errorf("ServiceMonitor selector %v does not select the service (%v)", sm.Spec.Selector.MatchLabels, r.service.Labels)
				}
				np := r.networkPolicy
				var ports []int
				for _, p := range np.Spec.Ingress[0].Ports {
					ports = append(ports, p.Port.IntValue())
				}
				if !slices.Equal(ports, []int{30020, 5001, 30443}) || np.Spec.Ingress[0].From[0].IPBlock.CIDR != "10.0.0.0/16" {
					t.Errorf("NetworkPolicy ingress %+v", np.Spec.Ingress)
				}
				if !selects(np.Spec.PodSelector.MatchLabels, r.daemonSet.Spec.Template.Labels) {
					t.Errorf("NetworkPolicy selects %v", np.Spec.PodSelector.MatchLabels)
				}
				caddyfile := r.configMap.Data["Caddyfile"]
				for _, want := range []string{"key_file /etc/peermirror/keys/{$NODE_NAME}.pem", "https://:30443 {",
					"auto_https disable_redirects", "protocols h1 h2",
					`filter_reference ":latest$"`, "record_ttl 20m", "reprovide_interval 5m",
					":30023 {\n\tbind 127.0.0.1\n\tpeermirror_debug {\n\t\tmirror http://127.0.0.1:30020"} {
					if !strings.Contains(caddyfile, want) {
						t.Errorf("Caddyfile lacks %q", want)
					}
				}
				if strings.Contains(caddyfile, "registries ") {
					t.Errorf("Caddyfile filters registries although all are mirrored")
				}
				mounts := mountsByName(r.daemonSet.Spec.Template.Spec.Containers[0].VolumeMounts)
				if m, ok := mounts["tls"]; !ok || !m.ReadOnly || m.MountPath != "/etc/peermirror/tls" {
					t.Errorf("tls mount %+v", m)
				}
				if m, ok := mounts["peer-keys"]; !ok || !m.ReadOnly {
					t.Errorf("peer-keys mount %+v", m)
				}
			},
		},
		{
			name:       "no hook, no metrics, no key",
			args:       []string{"--set", "uninstall.enabled=false,metrics.enabled=false,p2p.persistKey=false,priorityClassName="},
			kinds:      []string{"ConfigMap", "DaemonSet", "Service", "ServiceAccount"},
			registries: defaultRegistries,
			writable:   []string{"containerd-certs"},
			check: func(t *testing.T, r rendered) {
				if strings.Contains(r.configMap.Data["Caddyfile"], "metrics") || strings.Contains(r.configMap.Data["Caddyfile"], "key_file") {
					t.Errorf("Caddyfile:\n%s", r.configMap.Data["Caddyfile"])
				}
				if r.daemonSet.Spec.Template.Spec.PriorityClassName != "" {
					t.Errorf("priorityClassName %q", r.daemonSet.Spec.Template.Spec.PriorityClassName)
				}
			},
		},
	}
}

func TestChart(t *testing.T) {
	helm := testenv.ToolPath(t, "helm")
	repo := testenv.RepoRoot(t)
	chart := filepath.Join(repo, "charts", "peermirror")

	// helm lint, with the default and the GPU values
	for _, args := range [][]string{nil, {"-f", filepath.Join(chart, "values-gpu.yaml")}} {
		full := append([]string{"lint", "--strict", chart}, args...)
		if out, err := exec.Command(helm, full...).CombinedOutput(); err != nil {
			t.Errorf("helm %s: %v\n%s", strings.Join(full, " "), err, out)
		}
	}

	for _, vc := range valueCases(repo) {
		t.Run(vc.name, func(t *testing.T) {
			r := render(t, helm, vc.args...)
			if want := slices.Sorted(slices.Values(vc.kinds)); !slices.Equal(r.kinds, want) {
				t.Fatalf("kinds %v, want %v", r.kinds, want)
			}
			checkDaemonSet(t, r, vc)
			checkService(t, r)
			checkCaddyfile(t, r)
			if vc.hook {
				checkHook(t, r)
			}
			if vc.check != nil {
				vc.check(t, r)
			}
		})
	}
}

func checkDaemonSet(t *testing.T, r rendered, vc valueCase) {
	t.Helper()
	ds := r.daemonSet
	pod := ds.Spec.Template.Spec
	if !selects(ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels) {
		t.Errorf("selector %v does not select the template's labels %v", ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels)
	}
	if !pod.HostNetwork || pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, dnsPolicy %q: want the host network with cluster DNS", pod.HostNetwork, pod.DNSPolicy)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("the mirror's pods mount a service account token")
	}
	if pod.SecurityContext == nil || pod.SecurityContext.SeccompProfile == nil || pod.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod seccomp profile %+v", pod.SecurityContext)
	}
	if ds.Spec.Template.Annotations["checksum/config"] == "" {
		t.Errorf("no checksum/config annotation: a new Caddyfile would not roll the pods")
	}

	// tolerations and node selection
	var keys []string
	for _, tol := range pod.Tolerations {
		keys = append(keys, tol.Key)
		if tol.Effect != corev1.TaintEffectNoSchedule {
			t.Errorf("toleration %+v: want NoSchedule", tol)
		}
	}
	if !slices.Equal(keys, vc.tolerations) {
		t.Errorf("tolerations %v, want %v", keys, vc.tolerations)
	}
	if pod.NodeSelector["kubernetes.io/os"] != "linux" {
		t.Errorf("nodeSelector %v", pod.NodeSelector)
	}

	// volumes: host paths and which of them may be written
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	wantHost := map[string]string{
		"containerd-socket":  "/run/containerd/containerd.sock",
		"containerd-content": "/var/lib/containerd/io.containerd.content.v1.content",
		"containerd-config":  "/etc/containerd",
		"containerd-certs":   "/etc/containerd/certs.d",
	}
	for name, path := range wantHost {
		if v, ok := vols[name]; !ok || v.HostPath == nil || v.HostPath.Path != path {
			t.Errorf("volume %s = %+v, want hostPath %s", name, v, path)
		}
	}
	if v := vols["containerd-socket"]; v.HostPath != nil && (v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathSocket) {
		t.Errorf("containerd socket volume type %v, want Socket (never created by the kubelet)", v.HostPath.Type)
	}
	var writable []string
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		for _, m := range c.VolumeMounts {
			if v := vols[m.Name]; v.HostPath != nil && !m.ReadOnly && !slices.Contains(writable, m.Name) {
				writable = append(writable, m.Name)
			}
		}
	}
	slices.Sort(writable)
	if want := slices.Sorted(slices.Values(vc.writable)); !slices.Equal(writable, want) {
		t.Errorf("writable host paths %v, want %v", writable, want)
	}

	// the init container
	if len(pod.InitContainers) != 1 || pod.InitContainers[0].Name != "configure-containerd" {
		t.Fatalf("init containers %+v", pod.InitContainers)
	}
	ini := pod.InitContainers[0]
	if !slices.Equal(ini.Command, []string{"caddy"}) || ini.Args[0] != "peermirror-configure" {
		t.Errorf("init container runs %q %q", ini.Command, ini.Args)
	}
	var regs []string
	for _, a := range ini.Args {
		if r, ok := strings.CutPrefix(a, "--registry="); ok {
			regs = append(regs, r)
		}
	}
	if !slices.Equal(regs, vc.registries) {
		t.Errorf("registries %v, want %v", regs, vc.registries)
	}
	im := mountsByName(ini.VolumeMounts)
	for name, want := range map[string]corev1.VolumeMount{
		"containerd-config": {MountPath: "/host/etc/containerd", ReadOnly: true},
		"containerd-certs":  {MountPath: "/host/etc/containerd/certs.d"},
		"containerd-socket": {MountPath: "/host/run/containerd/containerd.sock", ReadOnly: true},
	} {
		if m := im[name]; m.MountPath != want.MountPath || m.ReadOnly != want.ReadOnly {
			t.Errorf("init mount %s = %+v, want %+v", name, m, want)
		}
	}
	if !slices.Contains(ini.Args, "--host-root=/host") || !slices.Contains(ini.Args, "--certs-dir=/etc/containerd/certs.d") ||
		!slices.Contains(ini.Args, "--containerd-config=/etc/containerd/config.toml") {
		t.Errorf("init args %q do not match its mounts", ini.Args)
	}
	checkSecurity(t, "init container", ini.SecurityContext)
	checkBurstable(t, "init container", ini.Resources)

	// the mirror
	if len(pod.Containers) != 1 {
		t.Fatalf("containers %+v", pod.Containers)
	}
	c := pod.Containers[0]
	checkSecurity(t, "mirror", c.SecurityContext)
	checkBurstable(t, "mirror", c.Resources)
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
		if p.HostPort != 0 && p.HostPort != p.ContainerPort {
			t.Errorf("port %+v: with the host network a host port must equal the container port", p)
		}
	}
	if ports["mirror"] != 30020 || ports["p2p"] != 5001 {
		t.Errorf("ports %v, want mirror 30020 and p2p 5001", ports)
	}
	probePort := "mirror"
	if withPeerTLS(r) {
		probePort = "ops" // the mirror listens on the node's loopback
	}
	for name, probe := range map[string]*corev1.Probe{
		"/.well-known/peermirror/v1/live":  c.LivenessProbe,
		"/.well-known/peermirror/v1/ready": c.ReadinessProbe,
	} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != name || probe.HTTPGet.Port.String() != probePort {
			t.Errorf("probe for %s = %+v", name, probe)
		}
	}
	mm := mountsByName(c.VolumeMounts)
	for name, path := range map[string]string{
		"containerd-socket":  "/run/containerd/containerd.sock",
		"containerd-content": "/var/lib/containerd/io.containerd.content.v1.content",
		"caddyfile":          "/etc/caddy",
	} {
		if m := mm[name]; m.MountPath != path || !m.ReadOnly {
			t.Errorf("mirror mount %s = %+v, want %s read-only", name, m, path)
		}
	}
	if _, ok := mm["containerd-certs"]; ok {
		t.Errorf("the mirror container mounts certs.d: only the init container may write there")
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if e := env["NODE_IP"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "status.hostIP" {
		t.Errorf("NODE_IP %+v, want the downward API's status.hostIP", e)
	}
}

func checkSecurity(t *testing.T, what string, sc *corev1.SecurityContext) {
	t.Helper()
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 ||
		(sc.Privileged != nil && *sc.Privileged) {
		t.Errorf("%s security context %+v: want no privilege, no capability, a read-only root", what, sc)
	}
}

// checkBurstable checks requests below limits for memory, and no CPU
// limit (throttling a relay slows every pull that goes through it).
func checkBurstable(t *testing.T, what string, res corev1.ResourceRequirements) {
	t.Helper()
	req, lim := res.Requests.Memory(), res.Limits.Memory()
	if req.IsZero() || lim.IsZero() || req.Cmp(*lim) >= 0 {
		t.Errorf("%s memory request %v, limit %v: want Burstable, request below limit", what, req, lim)
	}
	if res.Requests.Cpu().IsZero() || !res.Limits.Cpu().IsZero() {
		t.Errorf("%s CPU request %v, limit %v: want a request and no limit", what, res.Requests.Cpu(), res.Limits.Cpu())
	}
}

func checkService(t *testing.T, r rendered) {
	t.Helper()
	s := r.service
	if s.Spec.ClusterIP != corev1.ClusterIPNone || !s.Spec.PublishNotReadyAddresses {
		t.Errorf("service clusterIP %q, publishNotReadyAddresses %v: want headless, publishing not-ready pods", s.Spec.ClusterIP, s.Spec.PublishNotReadyAddresses)
	}
	if !selects(s.Spec.Selector, r.daemonSet.Spec.Template.Labels) {
		t.Errorf("service selector %v does not select the pods", s.Spec.Selector)
	}
	var ports []string
	for _, p := range s.Spec.Ports {
		ports = append(ports, p.Name+"="+p.TargetPort.String())
	}
	want := []string{"mirror=mirror", "p2p=p2p"}
	if withPeerTLS(r) {
		want = append(want, "ops=ops")
	}
	if !slices.Equal(ports, want) {
		t.Errorf("service ports %v, want %v", ports, want)
	}
}

// withPeerTLS reports whether the rendered chart has peerTLS on.
func withPeerTLS(r rendered) bool {
	return strings.Contains(r.configMap.Data["Caddyfile"], "peer_tls {")
}

func checkCaddyfile(t *testing.T, r rendered) {
	t.Helper()
	caddyfile := r.configMap.Data["Caddyfile"]
	bootstrap := "bootstrap_dns " + r.service.Name + ".kube-system.svc.cluster.local"
	mirrorPort := "mirror_port 30020"
	if withPeerTLS(r) {
		mirrorPort = "mirror_port 30021"
	}
	for _, want := range []string{bootstrap, "announce {$NODE_IP}", mirrorPort, ":30020 {",
		"address /run/containerd/containerd.sock", "content_dir /var/lib/containerd/io.containerd.content.v1.content"} {
		if !strings.Contains(caddyfile, want) {
			t.Errorf("Caddyfile lacks %q:\n%s", want, caddyfile)
		}
	}
	vols := map[string]corev1.Volume{}
	for _, v := range r.daemonSet.Spec.Template.Spec.Volumes {
		vols[v.Name] = v
	}
	if v := vols["caddyfile"]; v.ConfigMap == nil || v.ConfigMap.Name != r.configMap.Name {
		t.Errorf("the caddyfile volume %+v does not hold ConfigMap %s", v, r.configMap.Name)
	}
	if testing.Short() {
		return
	}

	// the real Caddy with the plugin accepts it
	dir := t.TempDir()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(caddyfile), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(testenv.CaddyBinary(t), "adapt", "--config", path, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "NODE_IP=10.1.2.3", "NODE_NAME=node-a", "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v\n%s", err, out)
	}
	var cfg struct {
		Apps struct {
			Peermirror struct {
				DHT struct {
					Announce     []string `json:"announce"`
					BootstrapDNS []string `json:"bootstrap_dns"`
					KeyFile      string   `json:"key_file"`
				} `json:"dht"`
			} `json:"peermirror"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("caddy adapt output: %v", err)
	}
	dht := cfg.Apps.Peermirror.DHT
	if !slices.Equal(dht.Announce, []string{"10.1.2.3"}) || len(dht.BootstrapDNS) != 1 {
		t.Errorf("adapted dht %+v: want the node IP announced and the headless service", dht)
	}
	if strings.Contains(caddyfile, "keys/{$NODE_NAME}") && dht.KeyFile != "/etc/peermirror/keys/node-a.pem" {
		t.Errorf("key_file %q, want the node's own key", dht.KeyFile)
	}
}

func checkHook(t *testing.T, r rendered) {
	t.Helper()
	job := r.job
	if job.Annotations["helm.sh/hook"] != "pre-delete" {
		t.Errorf("Job hook annotation %q, want pre-delete", job.Annotations["helm.sh/hook"])
	}
	for _, obj := range []metav1.ObjectMeta{r.role.ObjectMeta, r.roleBinding.ObjectMeta} {
		if obj.Annotations["helm.sh/hook"] != "pre-delete" || obj.Annotations["helm.sh/hook-weight"] >= job.Annotations["helm.sh/hook-weight"] {
			t.Errorf("%s: hook %q weight %q, want pre-delete before the Job", obj.Name, obj.Annotations["helm.sh/hook"], obj.Annotations["helm.sh/hook-weight"])
		}
	}
	pod := job.Spec.Template.Spec
	if pod.RestartPolicy != corev1.RestartPolicyNever || pod.ServiceAccountName != r.roleBinding.Subjects[0].Name ||
		r.roleBinding.RoleRef.Name != r.role.Name {
		t.Errorf("hook wiring: restart %q, service account %q, binding %+v", pod.RestartPolicy, pod.ServiceAccountName, r.roleBinding)
	}
	if pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot {
		t.Errorf("the hook runs as root")
	}
	checkSecurity(t, "uninstall hook", pod.Containers[0].SecurityContext)
	if selects(r.daemonSet.Spec.Selector.MatchLabels, job.Spec.Template.Labels) {
		t.Errorf("the DaemonSet's selector also selects the hook's pod")
	}

	// the hook may read and update this DaemonSet and list pods, no more
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, ResourceNames: []string{r.daemonSet.Name}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list"}},
	}
	gotRules, _ := json.Marshal(r.role.Rules)
	wantRules, _ := json.Marshal(want)
	if string(gotRules) != string(wantRules) {
		t.Errorf("Role rules %s, want %s", gotRules, wantRules)
	}

	// its arguments name this DaemonSet and its init container, and the
	// cleanup it sets is the init container's own form
	args := pod.Containers[0].Args
	sep := slices.Index(args, "--")
	if args[0] != "peermirror-uninstall" || sep < 0 {
		t.Fatalf("hook args %q", args)
	}
	if !slices.Contains(args, "--daemonset="+r.daemonSet.Name) || !slices.Contains(args, "--namespace=kube-system") ||
		!slices.Contains(args, "--init-container="+r.daemonSet.Spec.Template.Spec.InitContainers[0].Name) {
		t.Errorf("hook args %q do not name the DaemonSet and its init container", args)
	}
	cleanup := args[sep+1:]
	configure := r.daemonSet.Spec.Template.Spec.InitContainers[0].Args
	if cleanup[0] != "peermirror-cleanup" {
		t.Fatalf("cleanup args %q", cleanup)
	}
	for _, a := range cleanup[1:] {
		if !slices.Contains(configure, a) {
			t.Errorf("cleanup arg %s differs from the configure args %q", a, configure)
		}
	}
	checkUninstallAgainst(t, r, cleanup)
}

func mountsByName(ms []corev1.VolumeMount) map[string]corev1.VolumeMount {
	out := map[string]corev1.VolumeMount{}
	for _, m := range ms {
		out[m.Name] = m
	}
	return out
}

// selects reports whether every label of selector is in labels.
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
