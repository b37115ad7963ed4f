#!/usr/bin/env python3
"""CPU seconds of every asgigramd process and of its workers while a command runs.

    python3 benches/tree_cpu.py cargo bench --bench throughput -- burst
    python3 benches/tree_cpu.py cargo bench --bench throughput -- burst 1 1

Runs the command and reads /proc every 20 ms: each process named asgigramd,
and each child of one (the Python workers), with its user + system CPU time
as last seen before it exited. Prints one line per process and the sums, so
that the daemon's and the workers' CPU can be told apart (the throughput
bench prints only the daemon's). What a process used before it was first
seen (at most 20 ms of its start) is missed; the difference between a run
and the same run with one update (`burst 1 1`) is what the updates cost,
start-up and shutdown cancelling out.
"""

import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    """(name, ppid, cpu seconds) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    child = subprocess.Popen(sys.argv[1:])
    seen = {}  # pid -> [role, cpu last seen]
    while child.poll() is None:
        daemons = set()
        table = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                s = stat(int(entry))
                if s:
                    table[int(entry)] = s
        for pid, (name, _, _) in table.items():
            if name == "asgigramd":
                daemons.add(pid)
        for pid, (name, ppid, cpu) in table.items():
            role = "daemon" if pid in daemons else "worker" if ppid in daemons else None
            if role:
                seen.setdefault(pid, [role, cpu])[1] = cpu
        time.sleep(0.02)
    totals = {"daemon": 0.0, "worker": 0.0}
    for pid, (role, cpu) in sorted(seen.items()):
        print(f"tree_cpu: {role} pid {pid}: {cpu:.2f} s")
        totals[role] += cpu
    print(
        f"tree_cpu: daemons {totals['daemon']:.2f} s, workers {totals['worker']:.2f} s, "
        f"tree {totals['daemon'] + totals['worker']:.2f} s"
    )
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
