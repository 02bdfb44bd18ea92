package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// spawnRequests carries cmd.Start calls to the spawner goroutine.
var (
	spawnOnce     sync.Once
	spawnRequests chan spawnRequest
)

type spawnRequest struct {
	cmd *exec.Cmd
	err chan error
}

// spawn starts cmd from one goroutine locked to its OS thread for the life of
// the test binary. Pdeathsig fires when the thread that forked the child
// exits, not the process: Go may end threads (a goroutine that exits while
// locked to its thread takes the thread with it), so children are started
// from a thread that never ends.
func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnRequests = make(chan spawnRequest)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives until exit
			for r := range spawnRequests {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := spawnRequest{cmd: cmd, err: make(chan error, 1)}
	spawnRequests <- r
	return <-r.err
}

// process is a started long-running binary in its own process group, with
// stdout and stderr appended to a log file.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited
	waitErr error         // valid once done is closed
}

// startProcess starts bin with args in its own process group, with its
// output appended to logPath. The child is killed if the test binary dies
// (Pdeathsig), so even a test timeout does not leak it.
func startProcess(name, logPath string, env []string, bin string, args ...string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("starting %s: opening log: %w", name, err)
	}
	fmt.Fprintf(logFile, "=== testenv: starting %s %s at %s\n", bin, strings.Join(args, " "), time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawn(cmd); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	// The child holds its own copies of the descriptor.
	logFile.Close()
	p := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signalGroup sends sig to the process group.
func (p *process) signalGroup(sig syscall.Signal) error {
	err := syscall.Kill(-p.cmd.Process.Pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// stop sends SIGTERM to the group and waits up to hangTimeout, then sends
// SIGKILL. It reports an error if the process needed SIGKILL. After stop
// returns the process has exited, and the rest of its group was sent SIGKILL.
func (p *process) stop() error {
	if p.exited() {
		_ = p.signalGroup(syscall.SIGKILL) // stray children, if any
		return nil
	}
	if err := p.signalGroup(syscall.SIGTERM); err != nil {
		return fmt.Errorf("stopping %s: %w", p.name, err)
	}
	select {
	case <-p.done:
		_ = p.signalGroup(syscall.SIGKILL)
		return nil
	case <-time.After(hangTimeout):
	}
	p.kill()
	return fmt.Errorf("stopping %s: still running %s after SIGTERM, sent SIGKILL", p.name, hangTimeout)
}

// kill sends SIGKILL to the group and waits for the process to exit.
func (p *process) kill() {
	_ = p.signalGroup(syscall.SIGKILL)
	<-p.done
}

// noisyLogLines are startup lines left out of log tails: containerd logs
// two per plugin.
var noisyLogLines = []string{`msg="loading plugin"`, `msg="skip loading plugin"`}

// logTail returns the last lines of the log file at path, at most maxBytes,
// leaving out noisyLogLines.
func logTail(path string, maxLines, maxBytes int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	off := fi.Size() - int64(maxBytes)
	if off < 0 {
		off = 0
	}
	b, err := io.ReadAll(io.NewSectionReader(f, off, fi.Size()-off))
	if err != nil {
		return fmt.Sprintf("(reading log: %v)", err)
	}
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	var lines []string
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if !slices.ContainsFunc(noisyLogLines, func(n string) bool { return strings.Contains(line, n) }) {
			lines = append(lines, line)
		}
	}
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

// logTailOnFailure registers a cleanup that, if the test failed, logs the
// tail of the log file at path.
func logTailOnFailure(t T, what, path string) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testenv: tail of %s log %s:\n%s", what, path, logTail(path, 60, 64<<10))
		}
	})
}

// runTool runs a short-lived tool with combined output, in its own process
// group that is killed on timeout. The returned error carries the command
// line; the output is returned separately.
func runTool(env []string, bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := spawn(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s: %w", commandTimeout, err)
	}
	if err != nil {
		return out.String(), fmt.Errorf("running %s %s: %w", bin, strings.Join(args, " "), err)
	}
	return out.String(), nil
}
