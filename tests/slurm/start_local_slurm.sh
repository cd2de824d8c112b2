#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for tests/test_slurm_launcher.py; run as root.
#
#   bash tests/slurm/start_local_slurm.sh
#
# Installs Debian's slurm-wlm and munge when they are missing, writes a munge key and a
# slurm.conf for this host (2 CPUs, one "debug" partition, no accounting: sacct errors are
# harmless), starts munged, slurmctld and slurmd, and waits until sinfo shows the node idle.
# Running it again on a running cluster changes nothing. Exit status 0 once the node is idle.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "start_local_slurm.sh: run it as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

host=$(hostname -s)

# munge authenticates every message between the SLURM daemons and commands.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
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
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=${host} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 120); do
    if sinfo --noheader --states=idle --format=%N 2>/dev/null | grep -q .; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "start_local_slurm.sh: the node did not become idle in 120 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 1
