#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the real-submission test of `lctrain submit`
# (tests/test_submit.py). Needs root and Debian/Ubuntu apt. Idempotent: a second run finds the
# daemons up and returns at once; a run after a reboot restarts them.
#
#   munge (auth) + slurmctld (controller) + slurmd (the one compute node = this host).
#   No cgroups anywhere (containers lack them): proctrack/linuxproc, task/none, no accounting.
#   The node's CPUs come from nproc; memory is not tracked (select/cons_tres with CR_Core).
#
# Measured on the 2-core CI machine (Debian 12, Slurm 22.05): apt-get install ~10 s, daemons up ~3 s.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "slurm_setup: must run as root (installs packages and starts daemons)" >&2
    exit 1
fi
start=$(date +%s)
log() { echo "slurm_setup: $*"; }

NODE=$(hostname -s)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    # slurmctld keeps a node "idle" for SlurmdTimeout after its slurmd died: look at the process too
    [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    # the node answers and takes jobs (idle, mixed or allocated; not down/drained)
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)
    case "$state" in
        idle*|mix*|alloc*|completing*) return 0 ;;
        *) return 1 ;;
    esac
}

if cluster_up; then
    log "already running (node $NODE); nothing to do"
    exit 0
fi

# 1. packages (only what is missing; no recommends: no systemd, no docs)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    log "installing munge + slurm (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi

# 2. the hostname must resolve: Slurm and torchrun's rendezvous both use it
if ! getent hosts "$NODE" >/dev/null; then
    log "adding $NODE to /etc/hosts"
    echo "127.0.0.1 $NODE" >> /etc/hosts
fi

# 3. munge: a key (the package's postinst normally makes one) and the daemon, run as user munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "slurm_setup: munged did not come up" >&2; exit 1; }
fi

# 4. slurm.conf: one node, this host. Rewritten each time (the hostname or core count may differ).
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF" <<EOF
# Written by lctrain .ci/slurm_setup.sh: a single-node test cluster (no cgroups, no accounting).
ClusterName=lctrain-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# No cgroup.conf: Slurm 22.05 has no "CgroupPlugin=disabled" (slurmd fails on it) and autodetects
# a usable plugin without one; with proctrack/linuxproc and task/none nothing uses cgroups anyway.

# 5. daemons (they fork into the background themselves)
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    pkill_pid() { [ -s "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; }
    pkill_pid /run/slurmctld.pid
    log "starting slurmctld"
    if ! /usr/sbin/slurmctld; then
        echo "slurm_setup: slurmctld failed to start:" >&2
        tail -n 20 /var/log/slurm/slurmctld.log >&2 || true
        exit 1
    fi
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.1; done
else
    scontrol reconfigure >/dev/null
fi
if [ ! -s /run/slurmd.pid ] || ! kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; then
    log "starting slurmd"
    if ! /usr/sbin/slurmd; then
        echo "slurm_setup: slurmd failed to start:" >&2
        tail -n 20 /var/log/slurm/slurmd.log >&2 || true
        exit 1
    fi
fi
for _ in $(seq 150); do cluster_up && break; sleep 0.2; done
if ! cluster_up; then
    # a node that was down before (e.g. an unclean stop) needs an explicit resume
    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    for _ in $(seq 50); do cluster_up && break; sleep 0.2; done
fi
if ! cluster_up; then
    echo "slurm_setup: the cluster did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
    sinfo -N -l >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log >&2 || true
    tail -n 20 /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
log "cluster up: node $NODE, $(nproc) CPUs, partition debug ($(( $(date +%s) - start )) s)"
