"""Network state a task may leave in the container's network namespace.

The kernel keeps state after every socket's process is gone (TIME_WAIT above all): it would reach the next
task in this namespace (a port still taken, old connections in /proc/net/tcp), and a task cannot have a
namespace of its own (that needs CAP_SYS_ADMIN). So a container that has any such state is not clean, and
is replaced. PID 1 only."""

import os
from collections.abc import Set

# The counters of /proc/net/sockstat that belong to the network namespace (orphan, alloc and mem count
# the whole host): sockets in use, TIME_WAIT states and IP fragment queues.
SOCKSTAT_FILES = ("/proc/net/sockstat", "/proc/net/sockstat6")
SOCKSTAT_KEYS = (b"inuse", b"tw")
HAVE_SOCKSTAT = os.path.exists(SOCKSTAT_FILES[0])
_tcp_accepted_when_clean = [0]  # under gVisor: the passive opens counted at the last clean check


def leftovers(own_inodes: Set[int]) -> str:
    """Socket and connection state in the namespace that is not the runner's own control socket (inodes
    `own_inodes`), as 'tcp tw 1, unix 1' (empty when none)."""
    found = [f"unix {n}"] if (n := foreign_unix_sockets(own_inodes)) else []
    if HAVE_SOCKSTAT:
        found += sockstat_leftovers()
    elif (accepted := tcp_accepted()) != _tcp_accepted_when_clean[0]:
        # gVisor keeps no sockstat and lists no TIME_WAIT in /proc/net/tcp, yet a port stays taken. With
        # only loopback, every connection that got established was accepted in this namespace: any
        # since the last clean check may have left such state (a refused connect leaves none).
        found.append(f"tcp connections accepted: {accepted - _tcp_accepted_when_clean[0]}")
    return ", ".join(found)


def mark_clean() -> None:
    """The container was found clean: connections counted so far are not a later task's."""
    if not HAVE_SOCKSTAT:
        _tcp_accepted_when_clean[0] = tcp_accepted()


def sockstat_leftovers() -> list[str]:
    found = []
    for path in SOCKSTAT_FILES:
        try:
            with open(path, "rb", buffering=0) as f:
                rows = f.read().splitlines()
        except OSError:
            continue
        for row in rows:
            proto, _, rest = row.partition(b":")
            fields = rest.split()
            for key, value in zip(fields[::2], fields[1::2], strict=False):
                if key in SOCKSTAT_KEYS and proto != b"sockets" and value != b"0":
                    found.append(f"{proto.decode().lower()} {key.decode()} {value.decode()}")
    return found


def foreign_unix_sockets(own_inodes: Set[int]) -> int:
    """Unix sockets alive in the namespace other than the runner's own pair (all task processes are
    gone by now, so any such socket outlived them)."""
    try:
        with open("/proc/net/unix", "rb", buffering=0) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for row in rows if len(fields := row.split()) > 6 and int(fields[6]) not in own_inodes)


def tcp_accepted() -> int:
    """TCP connections accepted (passive opens) in this network namespace, from /proc/net/snmp."""
    try:
        with open("/proc/net/snmp", "rb", buffering=0) as f:
            rows = f.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(rows[::2], rows[1::2], strict=False):
        if names.startswith(b"Tcp:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(counters.get(b"PassiveOpens", 0))
    return 0
