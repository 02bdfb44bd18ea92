package uninstall

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var cleanupArgs = []string{"peermirror-cleanup", "--certs-dir", "/etc/containerd/certs.d", "--host-root", "/host"}

// fakeCluster is an API server with one DaemonSet and a controller that
// replaces its pods after each update, a node per list request.
type fakeCluster struct {
	t         *testing.T
	mu        sync.Mutex
	ds        *appsv1.DaemonSet
	missing   bool
	nodes     []string
	failNode  string // its cleanup exits 1
	conflicts int    // PUTs to refuse with 409 first
	puts      int
	lists     int
	strayPods []corev1.Pod
}

func newDaemonSet(args []string) *appsv1.DaemonSet {
	labels := map[string]string{"app.kubernetes.io/name": "peermirror"}
	return &appsv1.DaemonSet{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "DaemonSet"},
		ObjectMeta: metav1.ObjectMeta{Name: "pm", Namespace: "kube-system", UID: "ds-uid", Generation: 1, ResourceVersion: "1"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{"checksum/config": "abc"}},
				Spec: corev1.PodSpec{
					HostNetwork: true,
					InitContainers: []corev1.Container{{
						Name: "configure-containerd", Image: "peermirror:dev",
						Command: []string{"caddy"}, Args: args,
					}},
					Containers: []corev1.Container{{Name: "caddy", Image: "peermirror:dev"}},
				},
			},
			UpdateStrategy: appsv1.DaemonSetUpdateStrategy{Type: appsv1.OnDeleteDaemonSetStrategyType},
		},
	}
}

func (f *fakeCluster) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer tok" {
		http.Error(w, `{"message":"no token"}`, http.StatusUnauthorized)
		return
	}
	switch {
	case r.URL.Path == "/apis/apps/v1/namespaces/kube-system/daemonsets/pm" && r.Method == "GET":
		if f.missing {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"kind":"Status","message":"daemonsets.apps \"pm\" not found"}`)
			return
		}
		f.ds.Status = appsv1.DaemonSetStatus{DesiredNumberScheduled: int32(len(f.nodes)), ObservedGeneration: f.ds.Generation}
		json.NewEncoder(w).Encode(f.ds)
	case r.URL.Path == "/apis/apps/v1/namespaces/kube-system/daemonsets/pm" && r.Method == "PUT":
		f.puts++
		// what the hook sends must be a valid DaemonSet, every field known
		var ds appsv1.DaemonSet
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ds); err != nil {
			f.t.Errorf("PUT body is no DaemonSet: %v", err)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if f.conflicts > 0 || ds.ResourceVersion != f.ds.ResourceVersion {
			f.conflicts--
			f.ds.ResourceVersion += "1" // someone else wrote
			w.WriteHeader(http.StatusConflict)
			fmt.Fprint(w, `{"kind":"Status","message":"the object has been modified"}`)
			return
		}
		ds.Generation = f.ds.Generation + 1
		ds.ResourceVersion = f.ds.ResourceVersion + "1"
		f.ds = &ds
		f.lists = 0
		json.NewEncoder(w).Encode(f.ds)
	case r.URL.Path == "/api/v1/namespaces/kube-system/pods" && r.Method == "GET":
		if got := r.URL.Query().Get("labelSelector"); got != "app.kubernetes.io/name=peermirror" {
			f.t.Errorf("labelSelector = %q", got)
		}
		f.lists++
		json.NewEncoder(w).Encode(map[string]any{"kind": "PodList", "items": append(f.currentPods(), f.strayPods...)})
	default:
		http.Error(w, `{"message":"unexpected `+r.Method+" "+r.URL.Path+`"}`, http.StatusNotFound)
	}
}

// currentPods plays the DaemonSet controller: one pod per node, the
// first `lists` nodes already on the current template.
func (f *fakeCluster) currentPods() []corev1.Pod {
	var pods []corev1.Pod
	for i, node := range f.nodes {
		tmpl := f.ds.Spec.Template
		if i >= f.lists {
			// not replaced yet: the template before the update
			tmpl = newDaemonSet([]string{"peermirror-configure"}).Spec.Template
		}
		pod := corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "pm-" + node, Labels: tmpl.Labels,
				OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: "pm", UID: "ds-uid"}}},
			Spec: tmpl.Spec,
		}
		pod.Spec.NodeName = node
		exit := int32(0)
		if node == f.failNode {
			exit = 1
		}
		pod.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: "configure-containerd",
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: exit}}}}
		pods = append(pods, pod)
	}
	return pods
}

func TestRun(t *testing.T) {
	stray := corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "other", OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", UID: "other-uid"}}},
		Spec:       corev1.PodSpec{NodeName: "node-x", InitContainers: []corev1.Container{{Name: "configure-containerd"}}},
	}
	tests := []struct {
		name        string
		cluster     *fakeCluster
		startArgs   []string
		wantPuts    int
		wantCleaned []string
		wantErr     string
	}{
		{
			name:        "three nodes",
			cluster:     &fakeCluster{nodes: []string{"node-a", "node-b", "node-c"}, strayPods: []corev1.Pod{stray}},
			startArgs:   []string{"peermirror-configure"},
			wantPuts:    1,
			wantCleaned: []string{"node-a", "node-b", "node-c"},
		},
		{
			name:        "conflict on update",
			cluster:     &fakeCluster{nodes: []string{"node-a"}, conflicts: 1},
			startArgs:   []string{"peermirror-configure"},
			wantPuts:    2,
			wantCleaned: []string{"node-a"},
		},
		{
			name:        "already in cleanup form (a second helm uninstall)",
			cluster:     &fakeCluster{nodes: []string{"node-a", "node-b"}},
			startArgs:   cleanupArgs,
			wantPuts:    0,
			wantCleaned: []string{"node-a", "node-b"},
		},
		{
			name:      "no nodes",
			cluster:   &fakeCluster{},
			startArgs: []string{"peermirror-configure"},
			wantPuts:  1,
		},
		{
			name:      "daemonset gone",
			cluster:   &fakeCluster{missing: true},
			startArgs: []string{"peermirror-configure"},
		},
		{
			name:      "a node's cleanup fails",
			cluster:   &fakeCluster{nodes: []string{"node-a", "node-b"}, failNode: "node-b"},
			startArgs: []string{"peermirror-configure"},
			wantPuts:  1,
			wantErr:   "1 of 2 nodes done",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.cluster
			f.t = t
			f.ds = newDaemonSet(tt.startArgs)
			if slices.Equal(tt.startArgs, cleanupArgs) {
				f.ds.Spec.Template.Annotations[ModeAnnotation] = "cleanup"
				f.ds.Spec.UpdateStrategy = appsv1.DaemonSetUpdateStrategy{Type: appsv1.RollingUpdateDaemonSetStrategyType}
				f.ds.Spec.UpdateStrategy.RollingUpdate = &appsv1.RollingUpdateDaemonSet{}
				json.Unmarshal([]byte(`{"maxUnavailable":"100%","maxSurge":0}`), f.ds.Spec.UpdateStrategy.RollingUpdate)
				f.lists = len(f.nodes)
			}
			srv := httptest.NewServer(f)
			defer srv.Close()
			var log bytes.Buffer
			res, err := Run(context.Background(), Config{
				Client:        &Client{BaseURL: srv.URL, Token: "tok"},
				Namespace:     "kube-system",
				DaemonSet:     "pm",
				InitContainer: "configure-containerd",
				CleanupArgs:   cleanupArgs,
				Timeout:       2 * time.Second,
				PollInterval:  20 * time.Millisecond,
				Log:           &log,
			})
			t.Logf("log:\n%s", log.String())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "node-b: cleanup exited 1") {
					t.Fatalf("Run error = %v, want %q naming node-b", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if tt.wantErr == "" && !slices.Equal(res.Cleaned, tt.wantCleaned) {
				t.Errorf("cleaned %v, want %v", res.Cleaned, tt.wantCleaned)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.puts != tt.wantPuts {
				t.Errorf("%d updates, want %d", f.puts, tt.wantPuts)
			}
			if f.missing {
				return
			}
			ds := f.ds
			if got := ds.Spec.Template.Spec.InitContainers[0].Args; !slices.Equal(got, cleanupArgs) {
				t.Errorf("init container args %q, want %q", got, cleanupArgs)
			}
			if ds.Spec.Template.Spec.InitContainers[0].Command[0] != "caddy" || !ds.Spec.Template.Spec.HostNetwork ||
				ds.Spec.Template.Annotations["checksum/config"] != "abc" {
				t.Errorf("fields the hook does not own changed: %+v", ds.Spec.Template)
			}
			ru := ds.Spec.UpdateStrategy.RollingUpdate
			if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil ||
				ru.MaxUnavailable.String() != "100%" || ru.MaxSurge.IntValue() != 0 {
				t.Errorf("update strategy %+v, want a rolling update of every node at once", ds.Spec.UpdateStrategy)
			}
			if ds.Spec.Template.Annotations[ModeAnnotation] != "cleanup" {
				t.Errorf("annotations %v", ds.Spec.Template.Annotations)
			}
		})
	}
}

func TestRunNeedsConfig(t *testing.T) {
	if _, err := Run(context.Background(), Config{}); err == nil {
		t.Fatal("Run with an empty config: no error")
	}
}

func TestAPIErrorMessage(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprint(w, `{"kind":"Status","message":"daemonsets.apps \"pm\" is forbidden"}`)
	}))
	defer srv.Close()
	_, err := Run(context.Background(), Config{Client: &Client{BaseURL: srv.URL}, Namespace: "ns", DaemonSet: "pm",
		InitContainer: "c", CleanupArgs: cleanupArgs, Timeout: time.Second})
	if err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), "forbidden") {
		t.Fatalf("err = %v, want the 403 and its message", err)
	}
}
