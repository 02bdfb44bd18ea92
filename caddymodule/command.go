package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/hoststoml"
	"github.com/peermirror/peermirror/uninstall"
)

// Command names. The Helm chart's init container and pre-delete hook run
// them; on a plain containerd host an operator runs them by hand.
const (
	configureCommand = "peermirror-configure"
	cleanupCommand   = "peermirror-cleanup"
	uninstallCommand = "peermirror-uninstall"
)

// networkKeyCommand prints a key for the dht option network_key_file.
const networkKeyCommand = "peermirror-network-key"

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name: configureCommand,
		Usage: "--registry <host|_default>... [--mirror <target>]... [--certs-dir " +
			"<dir>] [--host-root <dir>] [--keep-existing]",
		Short: "Puts the peermirror mirror in front of containerd's registries (hosts.toml)",
		Long: `
Writes <certs-dir>/<registry>/hosts.toml for each --registry (or _default,
for every registry without a folder of its own): the mirror targets first,
with capabilities pull and resolve and a short dial_timeout, then the
registry itself as the server. The first run in a folder keeps the
hosts.toml found there beside it (hosts.toml.peermirror-backup); later runs
render from that backup, so running the command again changes nothing.
peermirror-cleanup puts the originals back. Folders configured earlier
for a registry no longer given are restored.

Then it checks containerd's configuration (--containerd-config and its
imports) and reports, as ERROR lines on stderr, any setting that makes
containerd ignore these files for CRI pulls or delete the layers the
mirror would serve. The rules follow containerd 2.4.2's code.

Paths are the node's paths; --host-root says where the node's / is
mounted when the command runs in a container (the Helm chart uses /host).
`,
		CobraFunc: func(cmd *cobra.Command) {
			f := cmd.Flags()
			f.String("certs-dir", "/etc/containerd/certs.d",
				"containerd's registry hosts folder (config_path), as the node sees it")
			f.String("host-root", "",
				"where the node's root folder is mounted in this container (empty: "+
					"this is the node)")
			f.StringSlice("registry", nil,
				"registry to mirror, by host name (docker.io, ghcr.io) or _default for "+
					"all; repeatable")
			f.StringSlice("mirror", []string{"http://127.0.0.1:30020"},
				"mirror target (URL, host:port or IP; IPv6 allowed), tried in order; "+
					"repeatable")
			f.StringSlice("upstream", nil,
				"registry=URL: the server written for that registry instead of its "+
					"default; repeatable")
			f.Bool("no-resolve", false, "give the mirror the pull capability only: tags are resolved at the registry")
			f.Duration("dial-timeout", hoststoml.DefaultDialTimeout, "dial_timeout of each mirror host; 0 writes none")
			f.Bool("keep-existing", false,
				"keep the hosts containerd used before (the original hosts.toml, or "+
					"_default's) after the mirror")
			f.String("containerd-config", "/etc/containerd/config.toml",
				"containerd's config file, as the node sees it; empty skips the check")
			f.String("containerd-address", "/run/containerd/containerd.sock",
				"containerd's socket, to learn its version for the check; empty skips "+
					"it")
			f.Bool("fail-on-error", false,
				"exit with status 1 when the check finds an error (the files are "+
					"written all the same)")
			f.String("termination-log", "",
				"also write the summary here (Kubernetes: /dev/termination-log, shown "+
					"by kubectl describe pod)")
			cmd.RunE = func(cmd *cobra.Command, _ []string) error {
				return runConfigure(cmd.Context(), cmd, cmd.OutOrStdout(), cmd.ErrOrStderr())
			}
		},
	})
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  cleanupCommand,
		Usage: "[--certs-dir <dir>] [--host-root <dir>]",
		Short: "Puts back the hosts.toml files that peermirror-configure replaced",
		Long: `
Restores every registry folder under --certs-dir that peermirror-configure
wrote to: the original hosts.toml byte for byte and with its mode, or no
hosts.toml where there was none; folders it made are removed when empty.
Folders it never touched are left alone; running the command again changes
nothing. A hosts.toml changed by someone else in the meantime is kept as
hosts.toml.peermirror-replaced.
`,
		CobraFunc: func(cmd *cobra.Command) {
			f := cmd.Flags()
			f.String("certs-dir", "/etc/containerd/certs.d", "containerd's registry hosts folder, as the node sees it")
			f.String("host-root", "",
				"where the node's root folder is mounted in this container (empty: "+
					"this is the node)")
			cmd.RunE = func(cmd *cobra.Command, _ []string) error {
				return runCleanup(cmd, cmd.OutOrStdout())
			}
		},
	})
	caddycmd.RegisterCommand(caddycmd.Command{
		Name: uninstallCommand,
		Usage: "--daemonset <name> [--namespace <ns>] [--init-container <name>] " +
			"[--timeout <d>] -- peermirror-cleanup <flags>...",
		Short: "Helm pre-delete hook: restores every node's hosts.toml before the chart goes",
		Long: `
Runs in the Helm chart's pre-delete Job, inside the cluster. It changes the
peermirror DaemonSet's init container to run the arguments after "--" (the
cleanup command) and rolls every pod at once; each new pod restores its
node's hosts.toml before anything else starts. It returns when every node
the DaemonSet runs on has done so, or fails after --timeout naming the
nodes still waited for, so that "helm uninstall" fails loudly rather than
leave a node pointing at a mirror that is gone.

It needs get and update on the DaemonSet and list on pods in its namespace.
`,
		CobraFunc: func(cmd *cobra.Command) {
			f := cmd.Flags()
			f.String("daemonset", "", "the peermirror DaemonSet's name")
			f.String("namespace", "", "its namespace (default: the pod's own)")
			f.String("init-container", "configure-containerd", "the init container that configures the node")
			f.Duration("timeout", 4*time.Minute,
				"how long to wait for every node; keep it under helm's --timeout (5m "+
					"by default)")
			cmd.RunE = func(cmd *cobra.Command, args []string) error {
				return runUninstall(cmd, args, cmd.OutOrStdout())
			}
		},
	})
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  networkKeyCommand,
		Short: "Prints a new random network key for the dht option network_key_file",
		Long: `
Prints a new pre-shared key for libp2p private networks to stdout, in the
format that the dht option network_key_file reads: the lines
/key/swarm/psk/1.0.0/ and /base16/, then 64 hex digits (32 bytes from the
system's secure random source). Give the same key to every node of the
cluster, for instance:

	(umask 077 && caddy peermirror-network-key > /etc/peermirror/network.key)

Whoever holds the key can join the DHT: keep it like a password.
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Args = cobra.NoArgs
			cmd.RunE = func(cmd *cobra.Command, _ []string) error {
				return runNetworkKey(cmd.OutOrStdout())
			}
		},
	})
}

// runNetworkKey is the peermirror-network-key command.
func runNetworkKey(stdout io.Writer) error {
	key, err := dht.GenerateNetworkKey()
	if err != nil {
		return err
	}
	_, err = stdout.Write(key)
	return err
}

// runConfigure is the peermirror-configure command.
func runConfigure(ctx context.Context, cmd *cobra.Command, stdout, stderr io.Writer) error {
	f := cmd.Flags()
	certsDir, _ := f.GetString("certs-dir")
	hostRoot, _ := f.GetString("host-root")
	registries, _ := f.GetStringSlice("registry")
	mirrors, _ := f.GetStringSlice("mirror")
	upstreamFlags, _ := f.GetStringSlice("upstream")
	noResolve, _ := f.GetBool("no-resolve")
	dial, _ := f.GetDuration("dial-timeout")
	keep, _ := f.GetBool("keep-existing")
	configFile, _ := f.GetString("containerd-config")
	address, _ := f.GetString("containerd-address")
	failOnError, _ := f.GetBool("fail-on-error")
	termLog, _ := f.GetString("termination-log")

	upstreams := map[string]string{}
	for _, u := range upstreamFlags {
		reg, target, ok := strings.Cut(u, "=")
		if !ok || reg == "" || target == "" {
			return fmt.Errorf("parsing --upstream %q: want registry=URL", u)
		}
		upstreams[reg] = target
	}
	if dial == 0 {
		dial = -1 // no dial_timeout line
	}
	opts := hoststoml.Options{
		CertsDir:     onHost(hostRoot, certsDir),
		Registries:   registries,
		Mirrors:      mirrors,
		Upstreams:    upstreams,
		PullOnly:     noResolve,
		DialTimeout:  dial,
		KeepExisting: keep,
	}

	// the files first: they are right whatever the check finds
	rep, err := hoststoml.Configure(opts)
	printReport(stdout, rep)
	if err != nil {
		writeTerminationLog(termLog, "configuring containerd failed: "+err.Error())
		return fmt.Errorf("configuring containerd's hosts: %w", err)
	}

	var findings []hoststoml.Finding
	if configFile != "" {
		version := containerdVersion(ctx, onHost(hostRoot, address))
		findings, err = hoststoml.CheckContainerdConfig(hoststoml.CheckOptions{
			ConfigFile:        configFile,
			HostRoot:          hostRoot,
			CertsDir:          certsDir,
			ContainerdVersion: version,
		})
		if err != nil {
			fmt.Fprintf(stderr, "WARNING: containerd's configuration was not checked: %v\n", err)
		}
		if version != "" {
			fmt.Fprintf(stdout, "containerd %s found at %s\n", version, address)
		}
	}
	errs := printFindings(stderr, findings)
	writeTerminationLog(termLog, summary(rep, findings))
	if errs > 0 && failOnError {
		return fmt.Errorf("containerd's configuration: %d errors (see above); the hosts.toml files were written", errs)
	}
	return nil
}

// runCleanup is the peermirror-cleanup command.
func runCleanup(cmd *cobra.Command, stdout io.Writer) error {
	certsDir, _ := cmd.Flags().GetString("certs-dir")
	hostRoot, _ := cmd.Flags().GetString("host-root")
	rep, err := hoststoml.Cleanup(onHost(hostRoot, certsDir))
	printReport(stdout, rep)
	if len(rep.Changes) == 0 && err == nil {
		fmt.Fprintln(stdout, "nothing to restore: no hosts.toml written by peermirror under "+certsDir)
	}
	if err != nil {
		return fmt.Errorf("restoring containerd's hosts: %w", err)
	}
	return nil
}

// runUninstall is the peermirror-uninstall command.
func runUninstall(cmd *cobra.Command, args []string, stdout io.Writer) error {
	f := cmd.Flags()
	ds, _ := f.GetString("daemonset")
	ns, _ := f.GetString("namespace")
	initName, _ := f.GetString("init-container")
	timeout, _ := f.GetDuration("timeout")
	if ds == "" {
		return errors.New("--daemonset is required")
	}
	if len(args) == 0 || args[0] != cleanupCommand {
		return fmt.Errorf("after -- give the init container's cleanup args, starting with %s", cleanupCommand)
	}
	cl, podNS, err := uninstall.InClusterClient()
	if err != nil {
		return err
	}
	if ns == "" {
		ns = podNS
	}
	res, err := uninstall.Run(cmd.Context(), uninstall.Config{
		Client:        cl,
		Namespace:     ns,
		DaemonSet:     ds,
		InitContainer: initName,
		CleanupArgs:   args,
		Timeout:       timeout,
		Log:           stdout,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "every node restored (%d)\n", len(res.Cleaned))
	return nil
}

// onHost maps a node path into this process's view, under hostRoot.
func onHost(hostRoot, p string) string {
	if hostRoot == "" || hostRoot == "/" || p == "" {
		return p
	}
	return filepath.Join(hostRoot, p)
}

// containerdVersion asks containerd for its version; "" when it does not
// answer.
func containerdVersion(ctx context.Context, address string) string {
	if address == "" {
		return ""
	}
	if _, err := os.Stat(address); err != nil {
		return ""
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cl, err := client.New(address, client.WithTimeout(5*time.Second))
	if err != nil {
		return ""
	}
	defer cl.Close()
	v, err := cl.Version(ctx)
	if err != nil {
		return ""
	}
	return v.Version
}

// printReport writes one line per registry folder, with its notes.
func printReport(w io.Writer, rep hoststoml.Report) {
	for _, c := range rep.Changes {
		fmt.Fprintf(w, "%s: %s %s\n", c.Registry, c.Action, c.Path)
		for _, n := range c.Notes {
			fmt.Fprintf(w, "  note: %s\n", n)
		}
	}
}

// printFindings writes the check's findings, errors framed so they stand
// out in a pod's log, and returns the number of errors.
func printFindings(w io.Writer, findings []hoststoml.Finding) int {
	var errs int
	for _, f := range findings {
		if f.Severity == hoststoml.SeverityError {
			errs++
		}
	}
	if errs > 0 {
		fmt.Fprintln(w, strings.Repeat("!", 72))
		fmt.Fprintf(w,
			"!! containerd on this node will not use the peermirror mirror as "+
				"configured (%d errors)\n", errs)
		fmt.Fprintln(w, strings.Repeat("!", 72))
	}
	for _, f := range findings {
		fmt.Fprintf(w, "%s: %s\n", strings.ToUpper(f.Severity.String()), f)
	}
	return errs
}

// summary is the short text for a Kubernetes termination message.
func summary(rep hoststoml.Report, findings []hoststoml.Finding) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d registries configured", len(rep.Changes))
	for _, f := range findings {
		if f.Severity >= hoststoml.SeverityWarning {
			fmt.Fprintf(&b, "\n%s: %s", strings.ToUpper(f.Severity.String()), f)
		}
	}
	return b.String()
}

// writeTerminationLog writes msg to path, when given; Kubernetes keeps at
// most 4096 bytes of it.
func writeTerminationLog(path, msg string) {
	if path == "" {
		return
	}
	if len(msg) > 4000 {
		msg = msg[:4000] + "..."
	}
	_ = os.WriteFile(path, []byte(msg+"\n"), 0o644)
}
