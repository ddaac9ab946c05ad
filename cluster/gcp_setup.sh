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
#   - service account tlcore-head: the custom role in gcp-head-role.yaml, only on VMs named
#     ray-<cluster>-..., may run VMs as tlcore-worker, objects of the one bucket;
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
prefix=${SSH_CIDR#*/}
if [[ "$SSH_CIDR" != */* || ! "$prefix" =~ ^[0-9]+$ || "$prefix" -lt 8 ]]; then
  echo "--ssh-cidr $SSH_CIDR opens SSH to a large part of the internet (or is not a network); give your office or VPN network, e.g. 198.51.100.0/24" >&2
  exit 2
fi

run() {  # print every command; run it unless --dry-run; "already exists" is not an error (run again safely)
  echo "+ ${*@Q}"   # quoted: each line can be pasted into a shell
  [[ $DRY_RUN == 1 ]] && return 0
  local out
  if ! out=$("$@" 2>&1); then
    grep -q "already exists" <<<"$out" && return 0
    echo "$out" >&2
    return 1
  fi
}

HERE=$(cd "$(dirname "$0")" && pwd)
G="gcloud --project=$PROJECT --quiet"
HEAD_SA="tlcore-head@$PROJECT.iam.gserviceaccount.com"
WORKER_SA="tlcore-worker@$PROJECT.iam.gserviceaccount.com"

# network: no default rules exist on a new network; these three are all there is
run $G compute networks create tlcore-net --subnet-mode=custom
run $G compute networks subnets create tlcore-subnet --network=tlcore-net --region="$REGION" --range=10.20.0.0/20 --enable-private-ip-google-access
run $G compute firewall-rules create tlcore-ssh --network=tlcore-net --direction=INGRESS --allow=tcp:22 --source-ranges="$SSH_CIDR" --target-tags=tlcore-head
run $G compute firewall-rules create tlcore-internal --network=tlcore-net --direction=INGRESS --allow=all --source-tags=tlcore --target-tags=tlcore
run $G compute routers create tlcore-router --network=tlcore-net --region="$REGION"
run $G compute routers nats create tlcore-nat --router=tlcore-router --region="$REGION" --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges

# identities
run $G iam service-accounts create tlcore-head --display-name="tlcore head (Ray autoscaler)"
run $G iam service-accounts create tlcore-worker --display-name="tlcore worker"
run $G iam roles create tlcoreAutoscaler --file="$HERE/gcp-head-role.yaml"
run $G projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$HEAD_SA" \
    --role="projects/$PROJECT/roles/tlcoreAutoscaler" \
    --condition="title=only-${CLUSTER},expression=resource.type != 'compute.googleapis.com/Instance' || resource.name.extract('/instances/{name}').startsWith('ray-${CLUSTER}-')"
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
