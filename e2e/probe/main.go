// sandbox-probe stands in for restic inside the agent's sandbox, in tests only: it reports, as
// one JSON line, what a program smuggled into a run would see and be able to do. The agent
// tests start an agent whose restic is this probe and read the line from the run's log.
//
// Standard library only, built static (CGO_ENABLED=0) by e2e/scripts/install-tools.sh, so it
// runs in the sandbox's minimal root, which has no libraries.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

type report struct {
	Args        []string          `json:"args"`
	Pid         int               `json:"pid"`
	Uid         int               `json:"uid"`
	Pids        []int             `json:"pids"`
	Status      map[string]string `json:"status"`
	Root        []string          `json:"root"`
	Hostname    string            `json:"hostname"`
	Environs    []string          `json:"environs"`
	Cmdlines    []string          `json:"cmdlines"`
	Attempts    map[string]string `json:"attempts"`
	Mounts      []string          `json:"mounts"`
	DataEntries []string          `json:"dataEntries"`
}

func errText(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// capabilities reports the capability sets and no_new_privs as /proc/self/status words them.
func capabilities() map[string]string {
	type header struct {
		version uint32
		pid     int32
	}
	type data struct{ effective, permitted, inheritable uint32 }
	hdr := header{version: 0x20080522}
	var d [2]data
	out := map[string]string{}
	if _, _, e := syscall.RawSyscall(syscall.SYS_CAPGET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&d[0])), 0); e != 0 {
		out["error"] = e.Error()
		return out
	}
	word := func(lo, hi uint32) string { return fmt.Sprintf("%016x", uint64(lo)|uint64(hi)<<32) }
	out["CapEff"] = word(d[0].effective, d[1].effective)
	out["CapPrm"] = word(d[0].permitted, d[1].permitted)
	out["CapInh"] = word(d[0].inheritable, d[1].inheritable)
	var bnd, amb uint64
	for c := uintptr(0); c < 64; c++ {
		if r, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, 23 /* PR_CAPBSET_READ */, c, 0); e == 0 && r == 1 {
			bnd |= 1 << c
		}
		if r, _, e := syscall.RawSyscall6(syscall.SYS_PRCTL, 47 /* PR_CAP_AMBIENT */, 1 /* IS_SET */, c, 0, 0, 0); e == 0 && r == 1 {
			amb |= 1 << c
		}
	}
	out["CapBnd"] = fmt.Sprintf("%016x", bnd)
	out["CapAmb"] = fmt.Sprintf("%016x", amb)
	nnp, _, _ := syscall.RawSyscall(syscall.SYS_PRCTL, 39 /* PR_GET_NO_NEW_PRIVS */, 0, 0)
	out["NoNewPrivs"] = strconv.Itoa(int(nnp))
	return out
}

func main() {
	// The agent first asks "restic snapshots" for the parent: answer "none", so that the
	// backup itself, whose output the agent streams, runs the probe.
	for _, a := range os.Args[1:] {
		if a == "snapshots" {
			fmt.Println("[]")
			return
		}
	}
	r := report{Args: os.Args[1:], Pid: os.Getpid(), Uid: os.Getuid(), Status: map[string]string{}, Attempts: map[string]string{}}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			r.Pids = append(r.Pids, pid)
			if b, err := os.ReadFile("/proc/" + e.Name() + "/environ"); err == nil {
				r.Environs = append(r.Environs, strings.ReplaceAll(string(b), "\x00", " "))
			}
			if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil {
				r.Cmdlines = append(r.Cmdlines, strings.ReplaceAll(string(b), "\x00", " "))
			}
		}
	}
	// Read from the kernel directly: the sandbox has no /proc/self/status.
	for key, value := range capabilities() {
		r.Status[key] = value
	}
	if root, err := os.ReadDir("/"); err == nil {
		for _, e := range root {
			r.Root = append(r.Root, e.Name())
		}
	}
	r.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if f := strings.Fields(line); len(f) > 4 {
				r.Mounts = append(r.Mounts, f[4])
			}
		}
	}
	if data, err := os.ReadDir("/data"); err == nil {
		for _, e := range data {
			r.DataEntries = append(r.DataEntries, e.Name())
		}
	}
	// What an attacker would try next.
	_, err := exec.Command("/bin/sh", "-c", "id").Output()
	r.Attempts["shell"] = errText(err)
	err = syscall.Exec("/data/x.sh", []string{"/data/x.sh"}, os.Environ())
	r.Attempts["execVolumeScript"] = errText(err)
	r.Attempts["writeRoot"] = errText(os.WriteFile("/planted", []byte("x"), 0o644))
	r.Attempts["writeVolume"] = errText(os.WriteFile("/data/planted", []byte("x"), 0o644))
	r.Attempts["mount"] = errText(syscall.Mount("tmpfs", "/tmp", "tmpfs", 0, ""))
	r.Attempts["readHostShadow"] = errText(func() error { _, err := os.ReadFile("/etc/shadow"); return err }())
	r.Attempts["chroot"] = errText(syscall.Chroot("/tmp"))
	r.Attempts["writeCorePattern"] = errText(os.WriteFile("/proc/sys/kernel/core_pattern", []byte("|/data/x.sh"), 0o644))
	r.Attempts["sysrq"] = errText(os.WriteFile("/proc/sysrq-trigger", []byte("h"), 0o200))
	r.Attempts["mountProc"] = errText(syscall.Mount("proc", "/tmp", "proc", 0, ""))
	r.Attempts["unshareUser"] = errText(syscall.Unshare(syscall.CLONE_NEWUSER))
	raw := func(nr uintptr, args ...uintptr) string {
		for len(args) < 6 {
			args = append(args, 0)
		}
		_, _, e := syscall.RawSyscall6(nr, args[0], args[1], args[2], args[3], args[4], args[5])
		if e == 0 {
			return "ok"
		}
		return e.Error()
	}
	// The "shocker" escape: a file handle opens any inode of the volume's file system.
	handle := make([]byte, 8+128)
	handle[0] = 128
	// Numbers the syscall package does not name: x86_64, else arm64.
	nr := map[string]uintptr{"open_by_handle_at": 304, "keyctl": 250, "bpf": 321}
	if runtime.GOARCH == "arm64" {
		nr = map[string]uintptr{"open_by_handle_at": 265, "keyctl": 219, "bpf": 280}
	}
	r.Attempts["openByHandle"] = raw(nr["open_by_handle_at"], uintptr(0), uintptr(unsafe.Pointer(&handle[0])), 0)
	r.Attempts["keyctl"] = raw(nr["keyctl"], 1 /* JOIN_SESSION_KEYRING */, 0)
	r.Attempts["bpf"] = raw(nr["bpf"], 0, 0, 0)
	r.Attempts["cloneNewUser"] = raw(syscall.SYS_CLONE, syscall.CLONE_NEWUSER|uintptr(syscall.SIGCHLD))
	r.Attempts["execTmp"] = errText(func() error {
		if err := os.WriteFile("/tmp/x", []byte("#!/.restic/restic\n"), 0o755); err != nil {
			return err
		}
		return syscall.Exec("/tmp/x", []string{"/tmp/x"}, nil)
	}())
	line, _ := json.Marshal(r)
	fmt.Printf("probe: %s\n", line)
	os.Exit(1)
}
