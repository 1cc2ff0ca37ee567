#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the slice (or reuse it), copy this checkout to every
# worker, install, and start jdistill.main on all workers at once.
#
# Usage: scripts/launch_tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://... \
#          --tfds-data-dir=gs://... [options] [-- FLAGS FOR jdistill.main]
#
#   --name=NAME            TPU VM name (env TPU_NAME)
#   --zone=ZONE            zone, e.g. us-central2-b (env TPU_ZONE)
#   --accelerator-type=T   slice type (env TPU_ACCELERATOR_TYPE; default v4-32)
#   --version=V            TPU VM runtime (env TPU_VERSION; default tpu-ubuntu2204-base, for v4;
#                          v5e, v5p, v6e: v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)
#   --project=P            GCP project (env TPU_PROJECT; default: gcloud's configured project)
#   --config=FILE[:ARG]    config (env JDISTILL_CONFIG; default configs/frs_gfl.py)
#   --workdir=gs://...     run directory, checkpoints and metrics (env JDISTILL_WORKDIR)
#   --tfds-data-dir=gs://  prepared data sets (env JDISTILL_TFDS_DATA_DIR)
#   --spot, --preemptible  create a cheaper slice that can be taken away; delete the preempted
#                          slice and launch again to resume from the last checkpoint
#   --dry-run              print every command, one per line, ready to paste; run nothing
#   -h, --help             this help
#
# Flags after -- go to jdistill.main, e.g. -- --config.batch_size=64. The committed tree is
# shipped (git archive HEAD), so every run matches a commit: commit before launching.
# The run lasts as long as the ssh session: launch from tmux or from a machine that stays up.

set -euo pipefail

die() { echo "launch_tpu_pod.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-}
accelerator_type=${TPU_ACCELERATOR_TYPE:-v4-32} version=${TPU_VERSION:-tpu-ubuntu2204-base}
config=${JDISTILL_CONFIG:-configs/frs_gfl.py}
workdir=${JDISTILL_WORKDIR:-} tfds_data_dir=${JDISTILL_TFDS_DATA_DIR:-}
provisioning='' dry_run=0

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --version) version=$2 ;;
    --project) project=$2 ;;
    --config) config=$2 ;;
    --workdir) workdir=$2 ;;
    --tfds-data-dir) tfds_data_dir=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot | --preemptible) provisioning=$1 ;;
    --) shift; break ;; # what remains is for jdistill.main
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "$1 needs a value"; set_option "$1" "$2"; shift ;;
    *) die "unexpected argument '$1' (flags for jdistill.main go after --)" ;;
  esac
  shift
done

[[ -n $name && -n $zone ]] || die "--name and --zone are required (see --help)"
# The workers of a pod share no disk, and the slice's disks go with it: the run and the data
# must be where every worker reads the same files and where they outlive the slice.
[[ $workdir == gs://* ]] ||
  die "--workdir must be a gs:// path (a TPU pod's workers share no local disk), got '$workdir'"
[[ $tfds_data_dir == gs://* ]] ||
  die "--tfds-data-dir must be a gs:// path (a TPU pod's workers share no local disk)," \
    "got '$tfds_data_dir'"

# One command as one line a shell reads back: plain words bare, the others in single quotes,
# after the = of a --flag= (--command='...'), the way one would type them.
show() {
  local word flag line='' plain='^[-[:alnum:]_./:=@,+%]*$' flag_re='^(--[[:alnum:]_.-]+=)(.*)$'
  for word; do
    flag=''
    if [[ $word =~ $flag_re ]]; then flag=${BASH_REMATCH[1]} word=${BASH_REMATCH[2]}; fi
    [[ -n $word && $word =~ $plain ]] || word="'${word//\'/\'\\\'\'}'"
    line+=" $flag$word"
  done
  echo "${line# }"
}
run() {
  if ((dry_run)); then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# (a) Reuse the slice when it exists, so relaunching (after a crash, or with other flags) skips
# the minutes a creation takes and keeps the installed venv.
describe=("${tpu[@]}" describe "$name" "${where[@]}")
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type"
  --version="$version" ${provisioning:+"$provisioning"})
if ((dry_run)); then
  echo "# the slice is created only if describe finds none:"
  echo "$(show "${describe[@]}") >/dev/null 2>&1 || $(show "${create[@]}")"
elif "${describe[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $name in $zone" >&2
else
  run "${create[@]}"
fi

# (b) Ship the committed tree: git archive leaves out .git, .venv and local runs by construction.
# The tarball in $TMPDIR is overwritten by the next launch.
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  echo "launch_tpu_pod.sh: warning: uncommitted changes are not shipped" >&2
fi
tarball=${TMPDIR:-/tmp}/jdistill-$name.tar.gz
run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$name:jdistill.tar.gz" --worker=all "${where[@]}"

# (c) Unpack a fresh copy and install into a venv beside it, which survives relaunches (pip then
# installs only what changed). jdistill needs Python >= 3.11 and the TPU VM images ship 3.10, so
# apt adds 3.11; the lock timeout waits out the unattended upgrades a fresh VM starts with.
# The usual TPU recipe: jax[tpu] (jax with its matching libtpu) first, then the project; no -U,
# so a relaunch keeps the jax the run started with.
setup='rm -rf jdistill && mkdir jdistill && tar -xzf jdistill.tar.gz -C jdistill'
setup+=' && { python3.11 -c "import ensurepip" 2>/dev/null || { sudo apt-get -qq update'
setup+=' && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600'
setup+=' install -y python3.11-venv; }; }'
setup+=' && { test -d jdistill-venv || python3.11 -m venv jdistill-venv; }'
setup+=' && jdistill-venv/bin/pip install -q "jax[tpu]"'
setup+=' && jdistill-venv/bin/pip install -q -e ./jdistill'
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$setup"

# (d) Every worker runs the same command; --multihost makes jdistill call
# jax.distributed.initialize(), which finds the other workers from the TPU metadata. The remote
# shell parses this string again, so printf %q quotes each word once more for it: values with
# spaces or quotes arrive as the words they were here.
main=(python -m jdistill.main --config="$config" --workdir="$workdir" --multihost "$@")
printf -v main_words '%q ' "${main[@]}"
remote="cd jdistill && . ../jdistill-venv/bin/activate"
remote+=" && TFDS_DATA_DIR=$(printf %q "$tfds_data_dir") ${main_words% }"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote"
