#!/usr/bin/env bash
# Create, once per Google Cloud project, the network and identities gcp-gpu.yaml's nodes run with.
#
#   bash cluster/gcp_setup.sh --project my-gcp-project --region europe-west4 --ssh-cidr 198.51.100.0/24 --bucket my-tlcore-data
#   bash cluster/gcp_setup.sh ... --dry-run      # print the gcloud commands, run nothing
#
# Without these, `ray up` puts every node on the project's `default` network (its default rules
# let SSH in from anywhere and every VM of the project reach Ray's ports), gives each node a public
# IP, and runs the nodes as the Compute Engine default account (Editor) or Ray's own
# ray-autoscaler-sa-v1 (compute admin, storage object admin on every bucket, service account user).
# This script makes instead:
#   - network tlcore-net with one subnet and no default rules; firewall: SSH from --ssh-cidr to the
#     head only, all traffic between the cluster's nodes, nothing else in; Cloud NAT so workers
#     without public IPs can still install packages;
#   - service account tlcore-head: the custom role in gcp-head-role.yaml, only on this cluster's
#     VMs (ray-<cluster>-head-... / -worker-...) and on tlcore-subnet, may run VMs as
#     tlcore-worker, objects of the one bucket. (compute.instances.list cannot be narrowed: IAM
#     checks it on the project, so the head can list every VM of the project with its
#     metadata. Give the cluster a project of its own if others hold secrets in theirs.);
#   - service account tlcore-worker: objects of the one bucket.
# Ray's bootstrap still creates ray-autoscaler-sa-v1 with its broad roles on each `ray up` (Ray has
# no switch for it); no tlcore node runs as it. cluster/README.md says how to strip it afterwards.
set -euo pipefail

PROJECT= REGION= SSH_CIDR= BUCKET= CLUSTER=tlcore-gcp DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --ssh-cidr) SSH_CIDR=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --cluster-name) CLUSTER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for v in PROJECT REGION SSH_CIDR BUCKET; do
  [[ -n "${!v}" ]] || { echo "missing --$(echo "$v" | tr 'A-Z_' 'a-z-') (see the header of $0)" >&2; exit 2; }
done
HERE=$(cd "$(dirname "$0")" && pwd)
# the network (at least /16 for IPv4, /48 for IPv6; a warning wider than /24), the bucket and the
# cluster name by Google's rules, before any gcloud call
SSH_CIDR=$(python3 "$HERE/checks.py" gcp --ssh-cidr "$SSH_CIDR" --bucket "$BUCKET" --cluster-name "$CLUSTER") || exit 2

run() {  # print every command; run it unless --dry-run
  echo "+ ${*@Q}"   # quoted: each line can be pasted into a shell
  [[ $DRY_RUN == 1 ]] && return 0
  "$@"
}

tolerant() {  # tolerant PATTERN command...: like run; an error whose message matches PATTERN is not one
  local expected=$1; shift
  echo "+ ${*@Q}"
  [[ $DRY_RUN == 1 ]] && return 0
  local out
  if ! out=$("$@" 2>&1); then
    grep -qi "$expected" <<<"$out" && return 0
    echo "$out" >&2
    return 1
  fi
}
create() { tolerant "already exists" "$@"; }                # the update after it applies the file
unbind() { tolerant "not found\|does not exist" "$@"; }    # a first run has no binding to remove

G="gcloud --project=$PROJECT --quiet"
HEAD_SA="tlcore-head@$PROJECT.iam.gserviceaccount.com"
WORKER_SA="tlcore-worker@$PROJECT.iam.gserviceaccount.com"

# network: no default rules exist on a new network; these three are all there is. Run again, the
# script brings existing rules and the role back to what this file says (an older, wider
# --ssh-cidr is replaced, not kept).
create $G compute networks create tlcore-net --subnet-mode=custom
create $G compute networks subnets create tlcore-subnet --network=tlcore-net --region="$REGION" --range=10.20.0.0/20 --enable-private-ip-google-access
create $G compute firewall-rules create tlcore-ssh --network=tlcore-net --direction=INGRESS --allow=tcp:22 --source-ranges="$SSH_CIDR" --target-tags=tlcore-head
run $G compute firewall-rules update tlcore-ssh --allow=tcp:22 --source-ranges="$SSH_CIDR" --target-tags=tlcore-head --source-tags=
create $G compute firewall-rules create tlcore-internal --network=tlcore-net --direction=INGRESS --allow=all --source-tags=tlcore --target-tags=tlcore
run $G compute firewall-rules update tlcore-internal --allow=all --source-tags=tlcore --target-tags=tlcore --source-ranges=
create $G compute routers create tlcore-router --network=tlcore-net --region="$REGION"
create $G compute routers nats create tlcore-nat --router=tlcore-router --region="$REGION" --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges

# identities
create $G iam service-accounts create tlcore-head --display-name="tlcore head (Ray autoscaler)"
create $G iam service-accounts create tlcore-worker --display-name="tlcore worker"
create $G iam roles create tlcoreAutoscaler --file="$HERE/gcp-head-role.yaml"
run $G iam roles update tlcoreAutoscaler --file="$HERE/gcp-head-role.yaml"
# The role's instance permissions hold only for this cluster's VMs (Ray names them
# ray-<cluster>-head-<8 hex>-compute and ray-<cluster>-worker-...: a cluster named tlcore-gcp-2
# does not match), subnetworks.use only for tlcore-subnet (not another VPC's subnet, where a VM
# could run as tlcore-worker out of this network's rules). No comma in the expression: gcloud
# splits --condition at commas.
only_this_cluster="(resource.type == 'compute.googleapis.com/Instance' && resource.name.extract('/instances/{name}').matches('^ray-${CLUSTER}-(head|worker)-[0-9a-f]{8}-compute\$'))"
only_this_cluster+=" || (resource.type == 'compute.googleapis.com/Subnetwork' && resource.name.endsWith('/regions/${REGION}/subnetworks/tlcore-subnet'))"
only_this_cluster+=" || (resource.type != 'compute.googleapis.com/Instance' && resource.type != 'compute.googleapis.com/Subnetwork')"
# an earlier binding (an older, wider condition) is removed first: bindings add up
unbind $G projects remove-iam-policy-binding "$PROJECT" --member="serviceAccount:$HEAD_SA" \
    --role="projects/$PROJECT/roles/tlcoreAutoscaler" --all
run $G projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$HEAD_SA" \
    --role="projects/$PROJECT/roles/tlcoreAutoscaler" \
    --condition="title=only-${CLUSTER},expression=${only_this_cluster}"
run $G iam service-accounts add-iam-policy-binding "$WORKER_SA" --member="serviceAccount:$HEAD_SA" --role=roles/iam.serviceAccountUser
for sa in "$HEAD_SA" "$WORKER_SA"; do
  run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --member="serviceAccount:$sa" --role=roles/storage.objectAdmin
done

cat <<EOT
In cluster/gcp-gpu.yaml (provider.project_id: $PROJECT):
  head:    serviceAccounts: [{email: $HEAD_SA, scopes: [https://www.googleapis.com/auth/cloud-platform]}]
  workers: serviceAccounts: [{email: $WORKER_SA, scopes: [https://www.googleapis.com/auth/cloud-platform]}]
  every node type: networkInterfaces subnetwork projects/$PROJECT/regions/$REGION/subnetworks/tlcore-subnet
EOT
