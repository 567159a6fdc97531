#!/usr/bin/env bash
# Install Slurm 22.05 (Debian's slurm-wlm) and munge for the tests' real cluster
# (tests/slurm_cluster.py). Idempotent: does nothing when the binaries are present.
# Needs root (CI containers run as root); daemons are started by the test fixture, not here.
set -euo pipefail
# Debian puts the daemons in /usr/sbin, which a non-root or `env -i` PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

needed=(slurmctld slurmd sbatch munged)
missing=0
for bin in "${needed[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [ "$missing" -eq 0 ]; then
    echo "slurm and munge already installed: $(slurmd -V)"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q slurm-wlm munge
# Debian's munge postinst writes /etc/munge/munge.key; make one if a minimal image skipped it.
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi
echo "installed: $(slurmd -V)"
