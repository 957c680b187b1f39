#!/bin/bash
# slurm/up.sh: a one-node Slurm cluster on localhost (Debian 12 / Slurm 22.05, as root, no systemd needed).
# Installs slurmctld, slurmd, slurm-client and munge from Debian when missing. Stop it with
# slurm/down.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# Only ever our own throwaway cluster: a slurm.conf or running daemons of a real one are not overwritten
if [ -s /etc/slurm/slurm.conf ] && ! grep -qx 'ClusterName=localcluster' /etc/slurm/slurm.conf; then
  echo "slurm/up.sh: /etc/slurm/slurm.conf belongs to another cluster; not replacing it" >&2; exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 755 /run/munge
# no systemd here: start munged by hand, as its user (a munged from an earlier bring-up is reused)
munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 || su -s /bin/sh munge -c /usr/sbin/munged
for i in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
H=$(hostname -s); C=$(nproc); M=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))
install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
# AuthInfo=cred_expire=10: a requeued job may start again after ~20 s instead of the default ~2 min.
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localcluster
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$H NodeAddr=127.0.0.1 CPUs=$C RealMemory=$M State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/slurmctld          # both daemonize and write the pid files above
/usr/sbin/slurmd
for i in $(seq 100); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.2; done
sinfo
