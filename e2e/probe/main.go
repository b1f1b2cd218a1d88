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
	"strconv"
	"strings"
	"syscall"
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
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			for _, key := range []string{"CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs"} {
				if strings.HasPrefix(line, key+":") {
					r.Status[key] = strings.TrimSpace(strings.TrimPrefix(line, key+":"))
				}
			}
		}
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
	r.Attempts["kill1"] = errText(syscall.Kill(1, 0))
	line, _ := json.Marshal(r)
	fmt.Printf("probe: %s\n", line)
	os.Exit(1)
}
