// Package uninstall runs the Helm chart's pre-delete hook: it turns the
// peermirror DaemonSet into its cleanup form, whose init container puts
// back each node's hosts.toml files, and waits until every node it is
// scheduled on has done so.
//
// Helm waits for hooks that are Jobs or Pods, never for a DaemonSet, and a
// preStop hook in the DaemonSet would run while Helm is already done. So a
// Job runs this: it changes the DaemonSet's init container to the cleanup
// command (and the rollout to all nodes at once), the DaemonSet controller
// replaces every pod, and each new pod's init container restores its node
// before anything else starts. The Job ends when, on every node the
// DaemonSet wants, a pod of the new template has run that init container
// to success; Helm deletes the DaemonSet after that.
package uninstall

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"
)

// ModeAnnotation marks the pod template of a DaemonSet in cleanup form,
// for the people reading it.
const ModeAnnotation = "peermirror.io/mode"

// Config says which DaemonSet to clean up with and how.
type Config struct {
	// Client reaches the API server. Required.
	Client *Client
	// Namespace is the DaemonSet's namespace. Required.
	Namespace string
	// DaemonSet is the DaemonSet's name. Required.
	DaemonSet string
	// InitContainer names the init container that configures the node.
	// Required.
	InitContainer string
	// CleanupArgs replace that init container's args. Required.
	CleanupArgs []string
	// Timeout bounds the whole wait. Default: 4m, under Helm's default
	// hook timeout of 5m.
	Timeout time.Duration
	// PollInterval is the pause between looks at the pods. Default: 2s.
	PollInterval time.Duration
	// Log receives one line per change of progress. Default: discarded.
	Log io.Writer
}

// Result says how the cleanup went.
type Result struct {
	// Cleaned lists the nodes whose hosts.toml files were put back.
	Cleaned []string
	// Pending describes, for a cleanup that did not finish in time, the
	// nodes still waited for ("node-a: pod Pending").
	Pending []string
	// Desired is the number of nodes the DaemonSet is scheduled on.
	Desired int
}

// Run switches the DaemonSet to its cleanup form and waits until every
// node has run the cleanup. A DaemonSet that is already gone is not an
// error: there is nothing left to clean with.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.DaemonSet == "" || cfg.InitContainer == "" ||
		len(cfg.CleanupArgs) == 0 {
		return Result{}, errors.New(
			"uninstall: client, namespace, daemonset, init container and cleanup " +
				"args are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 4 * time.Minute
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()

	dsPath := fmt.Sprintf("/apis/apps/v1/namespaces/%s/daemonsets/%s",
		url.PathEscape(cfg.Namespace), url.PathEscape(cfg.DaemonSet))
	ds, err := switchToCleanup(ctx, cfg, dsPath)
	if isStatus(err, 404) {
		fmt.Fprintf(cfg.Log, "daemonset %s/%s is gone: nothing to clean up with\n", cfg.Namespace, cfg.DaemonSet)
		return Result{}, nil
	}
	if err != nil {
		return Result{}, err
	}
	selector, err := labelSelector(ds)
	if err != nil {
		return Result{}, err
	}
	uid, _ := lookup(ds, "metadata", "uid").(string)

	// wait for every node
	var (
		last     Result
		seen     bool
		lastLine string
		lastErr  error
	)
	for {
		res, done, err := progress(ctx, cfg, dsPath, selector, uid)
		switch {
		case err != nil:
			lastErr = err
			if ctx.Err() == nil {
				// the API server may be briefly away: say so and look again
				fmt.Fprintf(cfg.Log, "looking at the pods: %v\n", err)
			}
		default:
			last, seen = res, true
			line := fmt.Sprintf("cleaned %d of %d nodes", len(res.Cleaned), res.Desired)
			if len(res.Pending) > 0 {
				line += "; waiting for " + strings.Join(res.Pending, ", ")
			}
			if line != lastLine {
				fmt.Fprintln(cfg.Log, line)
				lastLine = line
			}
			if done {
				return res, nil
			}
		}
		select {
		case <-ctx.Done():
			if !seen {
				return last, fmt.Errorf("waiting for the cleanup of every node: %w (last error: %v)", ctx.Err(), lastErr)
			}
			return last, fmt.Errorf(
				"waiting for the cleanup of every node: %d of %d nodes done after %s; "+
					"still waiting for %s",
				len(last.Cleaned), last.Desired, cfg.Timeout, describePending(last))
		case <-time.After(cfg.PollInterval):
		}
	}
}

func describePending(res Result) string {
	if len(res.Pending) == 0 {
		return "nodes that have no pod yet"
	}
	return strings.Join(res.Pending, ", ")
}

// switchToCleanup updates the DaemonSet to its cleanup form, retrying on
// conflicts, and returns it as stored.
func switchToCleanup(ctx context.Context, cfg Config, dsPath string) (map[string]any, error) {
	for attempt := 0; ; attempt++ {
		var ds map[string]any
		if err := cfg.Client.do(ctx, "GET", dsPath, nil, nil, &ds); err != nil {
			return nil, fmt.Errorf("reading daemonset: %w", err)
		}
		changed, err := toCleanupForm(ds, cfg.InitContainer, cfg.CleanupArgs)
		if err != nil {
			return nil, err
		}
		if !changed {
			fmt.Fprintf(cfg.Log, "daemonset %s/%s is already in cleanup form\n", cfg.Namespace, cfg.DaemonSet)
			return ds, nil
		}
		var stored map[string]any
		err = cfg.Client.do(ctx, "PUT", dsPath, nil, ds, &stored)
		if isStatus(err, 409) && attempt < 5 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("updating daemonset: %w", err)
		}
		fmt.Fprintf(cfg.Log,
			"daemonset %s/%s switched to cleanup form: every pod is replaced by "+
				"one that restores its node\n", cfg.Namespace, cfg.DaemonSet)
		return stored, nil
	}
}

// toCleanupForm changes the DaemonSet in place: the init container's
// args, the mode annotation, and a rollout to every node at once. It
// reports whether anything changed.
func toCleanupForm(ds map[string]any, initContainer string, args []string) (bool, error) {
	podSpec, ok := lookup(ds, "spec", "template", "spec").(map[string]any)
	if !ok {
		return false, errors.New("daemonset has no pod template")
	}
	inits, _ := podSpec["initContainers"].([]any)
	var ctr map[string]any
	for _, c := range inits {
		if m, ok := c.(map[string]any); ok && m["name"] == initContainer {
			ctr = m
		}
	}
	if ctr == nil {
		return false, fmt.Errorf("daemonset has no init container %q", initContainer)
	}
	changed := false
	if !slices.Equal(stringList(ctr["args"]), args) {
		ctr["args"] = toAnyList(args)
		changed = true
	}

	tmpl := ensureMap(ensureMap(ds, "spec"), "template")
	annotations := ensureMap(ensureMap(tmpl, "metadata"), "annotations")
	if annotations[ModeAnnotation] != "cleanup" {
		annotations[ModeAnnotation] = "cleanup"
		changed = true
	}

	strategy := ensureMap(ds, "spec")["updateStrategy"]
	want := map[string]any{
		"type":          "RollingUpdate",
		"rollingUpdate": map[string]any{"maxUnavailable": "100%", "maxSurge": 0},
	}
	if s, ok := strategy.(map[string]any); !ok || s["type"] != "RollingUpdate" ||
		lookup(s, "rollingUpdate", "maxUnavailable") != "100%" || !isZero(lookup(s, "rollingUpdate", "maxSurge")) {
		ensureMap(ds, "spec")["updateStrategy"] = want
		changed = true
	}
	return changed, nil
}

// progress looks at the DaemonSet and its pods once.
func progress(ctx context.Context, cfg Config, dsPath, selector, uid string) (Result, bool, error) {
	var ds map[string]any
	if err := cfg.Client.do(ctx, "GET", dsPath, nil, nil, &ds); err != nil {
		return Result{}, false, fmt.Errorf("reading daemonset: %w", err)
	}
	res := Result{Desired: int(number(lookup(ds, "status", "desiredNumberScheduled")))}
	observed := number(lookup(ds, "status", "observedGeneration"))
	generation := number(lookup(ds, "metadata", "generation"))

	var pods struct {
		Items []map[string]any `json:"items"`
	}
	q := url.Values{"labelSelector": {selector}}
	podsPath := fmt.Sprintf("/api/v1/namespaces/%s/pods", url.PathEscape(cfg.Namespace))
	if err := cfg.Client.do(ctx, "GET", podsPath, q, nil, &pods); err != nil {
		return res, false, fmt.Errorf("listing pods: %w", err)
	}
	cleaned := map[string]bool{}
	pending := map[string]string{}
	for _, pod := range pods.Items {
		if !ownedBy(pod, uid) {
			continue
		}
		node, _ := lookup(pod, "spec", "nodeName").(string)
		name, _ := lookup(pod, "metadata", "name").(string)
		if node == "" {
			node = "(unscheduled) " + name
		}
		if !runsCleanup(pod, cfg.InitContainer, cfg.CleanupArgs) {
			if !cleaned[node] {
				pending[node] = "old pod " + name + " not replaced yet"
			}
			continue
		}
		ok, why := initSucceeded(pod, cfg.InitContainer)
		if ok {
			cleaned[node] = true
			delete(pending, node)
		} else if !cleaned[node] {
			pending[node] = why
		}
	}
	for n := range cleaned {
		res.Cleaned = append(res.Cleaned, n)
	}
	sort.Strings(res.Cleaned)
	for n, why := range pending {
		res.Pending = append(res.Pending, n+": "+why)
	}
	sort.Strings(res.Pending)
	done := observed >= generation && len(pending) == 0 && len(cleaned) >= res.Desired
	return res, done, nil
}

// ownedBy reports whether the pod belongs to the DaemonSet with uid.
func ownedBy(pod map[string]any, uid string) bool {
	refs, _ := lookup(pod, "metadata", "ownerReferences").([]any)
	for _, r := range refs {
		if m, ok := r.(map[string]any); ok && m["kind"] == "DaemonSet" && (uid == "" || m["uid"] == uid) {
			return true
		}
	}
	return false
}

// runsCleanup reports whether the pod's init container has the cleanup
// args, that is, the pod comes from the cleanup form.
func runsCleanup(pod map[string]any, initContainer string, args []string) bool {
	inits, _ := lookup(pod, "spec", "initContainers").([]any)
	for _, c := range inits {
		if m, ok := c.(map[string]any); ok && m["name"] == initContainer {
			return slices.Equal(stringList(m["args"]), args)
		}
	}
	return false
}

// initSucceeded reports whether the init container has exited 0, or else
// what the pod is doing.
func initSucceeded(pod map[string]any, initContainer string) (bool, string) {
	statuses, _ := lookup(pod, "status", "initContainerStatuses").([]any)
	for _, s := range statuses {
		m, ok := s.(map[string]any)
		if !ok || m["name"] != initContainer {
			continue
		}
		if term, ok := lookup(m, "state", "terminated").(map[string]any); ok {
			if number(term["exitCode"]) == 0 {
				return true, ""
			}
			return false, fmt.Sprintf("cleanup exited %v (kubectl logs -c %s %s)",
				term["exitCode"], initContainer, lookup(pod, "metadata", "name"))
		}
		if w, ok := lookup(m, "state", "waiting").(map[string]any); ok {
			return false, fmt.Sprintf("cleanup waiting (%v)", w["reason"])
		}
		return false, "cleanup running"
	}
	phase, _ := lookup(pod, "status", "phase").(string)
	if phase == "" {
		phase = "unknown"
	}
	return false, "pod " + phase
}

// labelSelector formats the DaemonSet's matchLabels for a pod list.
func labelSelector(ds map[string]any) (string, error) {
	labels, _ := lookup(ds, "spec", "selector", "matchLabels").(map[string]any)
	if len(labels) == 0 {
		return "", errors.New("daemonset has no matchLabels selector")
	}
	var parts []string
	for k, v := range labels {
		parts = append(parts, fmt.Sprintf("%s=%v", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ","), nil
}

// lookup walks nested maps.
func lookup(m map[string]any, keys ...string) any {
	var cur any = m
	for _, k := range keys {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = mm[k]
	}
	return cur
}

// ensureMap returns m[k] as a map, making it when missing.
func ensureMap(m map[string]any, k string) map[string]any {
	if sub, ok := m[k].(map[string]any); ok {
		return sub
	}
	sub := map[string]any{}
	m[k] = sub
	return sub
}

func number(v any) float64 {
	f, _ := v.(float64)
	return f
}

func isZero(v any) bool {
	switch v := v.(type) {
	case float64:
		return v == 0
	case string:
		return v == "0" || v == "0%"
	case int:
		return v == 0
	}
	return false
}

func stringList(v any) []string {
	list, _ := v.([]any)
	out := make([]string, 0, len(list))
	for _, e := range list {
		s, _ := e.(string)
		out = append(out, s)
	}
	return out
}

func toAnyList(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}
