#!/usr/bin/env bash
# Creates the network that cluster/gcp.yaml uses: VPC `ssl-dist`, subnet `ssl-dist` in REGION,
# and two firewall rules for instances tagged `ssl-dist-ray`:
#   - SSH (22/tcp) from ADMIN_CIDR only;
#   - all TCP/UDP/ICMP between instances of the tag (GCS, raylets, object manager, NCCL, ...).
# Nothing else is opened: the dashboard (8265) and the Ray client server (10001) are reachable
# only inside the VPC; use `ray dashboard cluster/gcp.yaml` (SSH tunnel) to reach them.
# Usage: ADMIN_CIDR=203.0.113.7/32 PROJECT=my-project [REGION=us-central1] \
#          bash cluster/gcp-network.sh
set -euo pipefail
: "${ADMIN_CIDR:?set ADMIN_CIDR, e.g. 203.0.113.7/32}"
: "${PROJECT:?set PROJECT to the project id}"
if [ "$ADMIN_CIDR" = "0.0.0.0/0" ] || [ "$ADMIN_CIDR" = "::/0" ]; then
  echo "refusing ADMIN_CIDR=$ADMIN_CIDR: SSH would be open to the internet" >&2
  exit 2
fi
region=${REGION:-us-central1}
range=${SUBNET_RANGE:-10.42.0.0/20}
gcloud compute networks create ssl-dist --project "$PROJECT" --subnet-mode custom
gcloud compute networks subnets create ssl-dist --project "$PROJECT" --network ssl-dist \
  --region "$region" --range "$range"
gcloud compute firewall-rules create ssl-dist-ssh --project "$PROJECT" --network ssl-dist \
  --direction INGRESS --allow tcp:22 --source-ranges "$ADMIN_CIDR" --target-tags ssl-dist-ray
gcloud compute firewall-rules create ssl-dist-internal --project "$PROJECT" --network ssl-dist \
  --direction INGRESS --allow tcp,udp,icmp --source-tags ssl-dist-ray --target-tags ssl-dist-ray
