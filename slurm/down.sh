#!/bin/bash
# slurm/down.sh: cancel your jobs (scancel --user), stop slurmd, slurmctld and munged by PID, wipe Slurm's state. Packages stay.
# Only the cluster slurm/up.sh made: this stops its daemons and wipes Slurm's state
if [ -s /etc/slurm/slurm.conf ] && ! grep -qx 'ClusterName=localcluster' /etc/slurm/slurm.conf; then
  echo "slurm/down.sh: /etc/slurm/slurm.conf is not slurm/up.sh's; not stopping or wiping that cluster" >&2; exit 2
fi
stop() { [ -s "$1" ] || return 0; local p; p=$(cat "$1"); kill "$p" 2>/dev/null || return 0
  # PID 1 here reaps late: a zombie (state Z) counts as stopped
  for i in $(seq 100); do st=$(ps -o stat= -p "$p" 2>/dev/null || true)
    { [ -z "$st" ] || [[ $st == Z* ]]; } && break; sleep 0.1; done; }
if scontrol ping >/dev/null 2>&1; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for i in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop /run/slurm/slurmd.pid; stop /run/slurm/slurmctld.pid; stop /run/munge/munged.pid
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
