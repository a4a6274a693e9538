#!/usr/bin/env bash
# Creates the security group that cluster/aws.yaml names in every node type:
#   - SSH (22/tcp) from ADMIN_CIDR only (your office / VPN range, or your IP as a.b.c.d/32);
#   - all traffic between members of the group (GCS 6379, raylets, object manager, NCCL, ...).
# Nothing else is opened: the dashboard (8265) and the Ray client server (10001) are reachable
# only inside the group; reach the dashboard with `ray dashboard cluster/aws.yaml` (SSH tunnel).
# Usage: ADMIN_CIDR=203.0.113.7/32 [VPC_ID=vpc-...] [AWS_REGION=us-east-1] \
#          bash cluster/aws-security-group.sh
# Prints the group id; put it in SecurityGroupIds and a subnet of the VPC in SubnetIds.
set -euo pipefail
: "${ADMIN_CIDR:?set ADMIN_CIDR, e.g. 203.0.113.7/32}"
if [ "$ADMIN_CIDR" = "0.0.0.0/0" ] || [ "$ADMIN_CIDR" = "::/0" ]; then
  echo "refusing ADMIN_CIDR=$ADMIN_CIDR: SSH would be open to the internet" >&2
  exit 2
fi
region=${AWS_REGION:-us-east-1}
name=${GROUP_NAME:-ssl-dist-ray}
vpc=${VPC_ID:-$(aws ec2 describe-vpcs --region "$region" --filters Name=isDefault,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}
sg=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" --group-name "$name" \
  --description "ssl-dist Ray cluster: SSH from admin CIDR, all traffic within the group" \
  --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
  --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ADMIN_CIDR}]"
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]"
echo "$sg"
