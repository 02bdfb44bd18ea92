package deploytest

import (
	"context"
	"encoding/json"
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

	"github.com/peermirror/peermirror/uninstall"
)

// checkUninstallAgainst runs the hook's logic, with the args the chart
// gives the hook, against an API server holding the chart's own
// DaemonSet, with two nodes whose pods follow every template change. The
// updated DaemonSet must still decode strictly, run the cleanup in its
// init container, and roll to every node at once.
func checkUninstallAgainst(t *testing.T, r rendered, cleanupArgs []string) {
	t.Helper()
	ds := r.daemonSet.DeepCopy()
	ds.UID = "uid-1"
	ds.Generation = 1
	ds.ResourceVersion = "1"
	nodes := []string{"node-a", "node-b"}

	var mu sync.Mutex
	dsPath := "/apis/apps/v1/namespaces/kube-system/daemonsets/" + ds.Name
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case req.URL.Path == dsPath && req.Method == "GET":
			ds.Status = appsv1.DaemonSetStatus{DesiredNumberScheduled: int32(len(nodes)), ObservedGeneration: ds.Generation}
			json.NewEncoder(w).Encode(ds)
		case req.URL.Path == dsPath && req.Method == "PUT":
			var updated appsv1.DaemonSet
			dec := json.NewDecoder(req.Body)
			dec.DisallowUnknownFields()
			if err := dec.Decode(&updated); err != nil {
				t.Errorf("the hook's update is no DaemonSet: %v", err)
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			updated.Generation = ds.Generation + 1
			ds = &updated
			json.NewEncoder(w).Encode(ds)
		case req.URL.Path == "/api/v1/namespaces/kube-system/pods" && req.Method == "GET":
			var pods []corev1.Pod
			for _, n := range nodes {
				pod := corev1.Pod{
					ObjectMeta: metav1.ObjectMeta{Name: ds.Name + "-" + n, Labels: ds.Spec.Template.Labels,
						OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: ds.Name, UID: ds.UID}}},
					Spec: *ds.Spec.Template.Spec.DeepCopy(),
				}
				pod.Spec.NodeName = n
				pod.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: pod.Spec.InitContainers[0].Name,
					State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0}}}}
				pods = append(pods, pod)
			}
			json.NewEncoder(w).Encode(corev1.PodList{Items: pods})
		default:
			http.Error(w, "unexpected "+req.Method+" "+req.URL.Path, http.StatusNotFound)
		}
	}))
	defer srv.Close()

	res, err := uninstall.Run(context.Background(), uninstall.Config{
		Client:        &uninstall.Client{BaseURL: srv.URL},
		Namespace:     "kube-system",
		DaemonSet:     r.daemonSet.Name,
		InitContainer: r.daemonSet.Spec.Template.Spec.InitContainers[0].Name,
		CleanupArgs:   cleanupArgs,
		Timeout:       5 * time.Second,
		PollInterval:  10 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("uninstall against the chart's DaemonSet: %v", err)
	}
	if !slices.Equal(res.Cleaned, nodes) {
		t.Errorf("cleaned %v, want %v", res.Cleaned, nodes)
	}
	mu.Lock()
	defer mu.Unlock()
	ini := ds.Spec.Template.Spec.InitContainers[0]
	if !slices.Equal(ini.Args, cleanupArgs) || !slices.Equal(ini.Command, []string{"caddy"}) {
		t.Errorf("init container after the hook: %q %q, want caddy %q", ini.Command, ini.Args, cleanupArgs)
	}
	// the cleanup needs the same mounts as the configure step
	if m := mountsByName(ini.VolumeMounts)["containerd-certs"]; m.ReadOnly || !strings.HasPrefix(m.MountPath, "/host/") {
		t.Errorf("certs mount after the hook: %+v", m)
	}
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "100%" {
		t.Errorf("update strategy after the hook: %+v", ds.Spec.UpdateStrategy)
	}
}
