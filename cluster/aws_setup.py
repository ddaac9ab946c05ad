"""Create, once per AWS account and region, the network and identities aws-gpu.yaml's nodes run with.

    pip install -e '.[aws]'          # boto3, which `ray up` needs too
    python cluster/aws_setup.py --region eu-west-1 --ssh-cidr 198.51.100.0/24 --bucket my-tlcore-data

Without these, `ray up` makes its own: a security group with SSH open to 0.0.0.0/0 beside any
rule you ask for, and a head role with AmazonEC2FullAccess + AmazonS3FullAccess (every bucket in
the account, medical data included). This script makes instead:

- security group `<cluster>-nodes`: SSH from --ssh-cidr, all traffic between the cluster's own
  nodes, no other inbound rule (Ray's ports stay closed to everyone else);
- role + instance profile `<cluster>-head` (cluster/aws-head-policy.json): launch instances only
  tagged for this cluster, stop/terminate/tag only those, pass the worker role, the one bucket;
- role + instance profile `<cluster>-worker` (cluster/aws-worker-policy.json): the one bucket;
- EC2's service-linked role for Spot (AWSServiceRoleForEC2Spot), if the account lacks it: AWS makes
  it only for a Spot request from the console, and a RunInstances for a spot node type (gpu1,
  gpu4) fails without it; the head's role may not create IAM roles.

It can be run again: it finds what it made, puts the policies back as the JSON files say and
removes inbound rules someone added by hand. It prints the lines to put in aws-gpu.yaml.
"""

import argparse
import ipaddress
import json
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checks import SetupInputError, check_bucket, check_cidr, check_cluster_name  # noqa: E402  (this folder)

EC2_TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                     "Action": "sts:AssumeRole"}]}
POLICY_NAME = "tlcore"


def policy(file: str, **values) -> str:
    """A policy JSON of this folder with its ${PLACEHOLDERS} filled in."""
    return json.dumps(json.loads(string.Template((HERE / file).read_text()).substitute(values)))


def _rules(permissions: list) -> list[tuple]:
    """EC2's IpPermissions, one (protocol, from port, to port, kind, source) per source."""
    out = []
    for p in permissions:
        ports = (p.get("FromPort"), p.get("ToPort")) if p["IpProtocol"] != "-1" else (None, None)
        out += [(p["IpProtocol"], *ports, "CidrIp", r["CidrIp"]) for r in p.get("IpRanges", [])]
        out += [(p["IpProtocol"], *ports, "CidrIpv6", r["CidrIpv6"]) for r in p.get("Ipv6Ranges", [])]
        out += [(p["IpProtocol"], *ports, "GroupId", g["GroupId"]) for g in p.get("UserIdGroupPairs", [])]
        out += [(p["IpProtocol"], *ports, "PrefixListId", g["PrefixListId"]) for g in p.get("PrefixListIds", [])]
    return out


def _permissions(rules) -> list[dict]:
    """The inverse of _rules, for authorize/revoke calls."""
    lists = {"CidrIp": "IpRanges", "CidrIpv6": "Ipv6Ranges", "GroupId": "UserIdGroupPairs",
             "PrefixListId": "PrefixListIds"}
    out = []
    for proto, lo, hi, kind, source in sorted(rules, key=str):
        p = {"IpProtocol": proto, lists[kind]: [{kind: source}]}
        if lo is not None:
            p.update(FromPort=lo, ToPort=hi)
        out.append(p)
    return out


def _security_group(ec2, cluster: str, vpc_id: str, ssh_cidr: str) -> str:
    name = f"{cluster}-nodes"
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    if found:
        group = found[0]
    else:
        gid = ec2.create_security_group(GroupName=name, VpcId=vpc_id,
                                        Description=f"{cluster}: SSH from {ssh_cidr}, all traffic between its nodes",
                                        TagSpecifications=[{"ResourceType": "security-group",
                                                            "Tags": [{"Key": "ray-cluster-name", "Value": cluster}]}])["GroupId"]
        group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
    gid = group["GroupId"]
    ssh_kind = "CidrIpv6" if ipaddress.ip_network(ssh_cidr).version == 6 else "CidrIp"  # IPv6: Ipv6Ranges
    wanted = {("tcp", 22, 22, ssh_kind, ssh_cidr), ("-1", None, None, "GroupId", gid)}
    have = set(_rules(group["IpPermissions"]))
    if have - wanted:  # nothing else: rules added by hand (or an older --ssh-cidr) go
        ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=_permissions(have - wanted))
    if wanted - have:
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=_permissions(wanted - have))
    return gid


def _instance_profile(iam, name: str, policy_document: str) -> str:
    """Role `name` (assumed by EC2) with exactly `policy_document`, in instance profile `name`; its ARN."""
    errors = iam.exceptions
    try:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
                        Description="tlcore cluster nodes (cluster/aws_setup.py)")
    except errors.EntityAlreadyExistsException:
        pass
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:  # no managed extras
        iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
    for other in iam.list_role_policies(RoleName=name)["PolicyNames"]:
        if other != POLICY_NAME:
            iam.delete_role_policy(RoleName=name, PolicyName=other)
    iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=policy_document)
    try:
        iam.create_instance_profile(InstanceProfileName=name)
    except errors.EntityAlreadyExistsException:
        pass
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in [r["RoleName"] for r in profile["Roles"]]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def _spot_service_linked_role(iam) -> None:
    """AWSServiceRoleForEC2Spot, once per account: EC2 needs it to launch spot instances."""
    path = "/aws-service-role/spot.amazonaws.com/"
    if not iam.list_roles(PathPrefix=path)["Roles"]:
        iam.create_service_linked_role(AWSServiceName="spot.amazonaws.com")


def setup(region: str, ssh_cidr: str, bucket: str, cluster: str = "tlcore-aws", vpc_id: str | None = None) -> dict:
    """Create (or bring back in line) the group, the two profiles and EC2's Spot role; returns their ids."""
    import boto3

    try:  # before any call to AWS
        ssh_cidr = check_cidr(ssh_cidr)
        check_bucket(bucket, "aws")
        check_cluster_name(cluster, "aws")
    except SetupInputError as e:
        raise SystemExit(f"error: {e}") from None
    ec2, iam = boto3.client("ec2", region_name=region), boto3.client("iam", region_name=region)
    account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise SystemExit(f"{region} has no default VPC; pass --vpc-id (the VPC of the subnets the nodes use)")
        vpc_id = vpcs[0]["VpcId"]
    group = _security_group(ec2, cluster, vpc_id, ssh_cidr)
    _spot_service_linked_role(iam)
    values = {"REGION": region, "ACCOUNT": account, "CLUSTER": cluster, "BUCKET": bucket, "SECURITY_GROUP": group}
    return {"security_group_id": group, "vpc_id": vpc_id,
            "head_profile_arn": _instance_profile(iam, f"{cluster}-head", policy("aws-head-policy.json", **values)),
            "worker_profile_arn": _instance_profile(iam, f"{cluster}-worker", policy("aws-worker-policy.json", **values))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", required=True, help="provider.region of aws-gpu.yaml")
    parser.add_argument("--ssh-cidr", required=True, help="the network SSH may come from (your office or VPN)")
    parser.add_argument("--bucket", required=True, help="the one S3 bucket the nodes may read and write")
    parser.add_argument("--cluster-name", default="tlcore-aws", help="cluster_name of aws-gpu.yaml")
    parser.add_argument("--vpc-id", help="default: the region's default VPC")
    args = parser.parse_args(argv)
    made = setup(args.region, args.ssh_cidr, args.bucket, args.cluster_name, args.vpc_id)
    print(f"security group {made['security_group_id']} in {made['vpc_id']}; instance profiles ready.\n"
          "In cluster/aws-gpu.yaml, every node type's node_config:\n"
          f"  SecurityGroupIds: [{made['security_group_id']}]\n"
          f"head:     IamInstanceProfile: {{Arn: {made['head_profile_arn']}}}\n"
          f"gpu1/4/8: IamInstanceProfile: {{Arn: {made['worker_profile_arn']}}}")


if __name__ == "__main__":
    sys.exit(main())
