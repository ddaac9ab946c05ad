"""What the setup scripts accept before they call a cloud: the SSH network, the bucket and the
cluster name, by the providers' own rules. aws_setup.py imports it; gcp_setup.sh runs it:

    python3 cluster/checks.py gcp --ssh-cidr 198.51.100.0/24 --bucket my-data --cluster-name tlcore-gcp

Exit 2 with one line naming the fix; a warning (a network wider than /24) goes to stderr.
No dependency beyond the standard library (it runs before anything is installed).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys

# The widest SSH networks accepted: a /16 (IPv4) is a campus or a VPN pool, a /48 (IPv6) one
# site. Anything wider takes in rentable address space of clouds and ISPs (3.0.0.0/8 is AWS's).
WIDEST = {4: 16, 6: 48}
WARN_WIDER_THAN = {4: 24, 6: 56}


class SetupInputError(ValueError):
    """A flag of a setup script that the provider would refuse, or that would open too much."""


def check_cidr(cidr: str) -> str:
    """The network SSH may come from, normalised; too wide (or not a network) is refused."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise SetupInputError(f"--ssh-cidr {cidr}: not a network; give yours, e.g. 198.51.100.0/24, "
                              "198.51.100.7/32 or 2001:db8:1234::/48") from None
    if net.prefixlen < WIDEST[net.version]:
        raise SetupInputError(f"--ssh-cidr {cidr} opens SSH to a large part of the internet (wider than "
                              f"/{WIDEST[net.version]}); give your office or VPN network (e.g. 198.51.100.0/24), "
                              "or your own address with /32")
    if net.prefixlen < WARN_WIDER_THAN[net.version]:
        print(f"warning: --ssh-cidr {net} lets SSH in from {net.num_addresses:,} addresses; "
              f"a /{WARN_WIDER_THAN[net.version]} or narrower (your VPN's exit addresses) is usually enough",
              file=sys.stderr)
    return str(net)


_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def check_bucket(name: str, provider: str) -> str:
    """One bucket by the provider's naming rules (a pattern such as `*` is never a bucket)."""
    if provider == "aws":
        ok = (re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name) and ".." not in name and not _IP.match(name)
              and not name.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
              and not name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3")))
        rule = "3-63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit"
    else:
        parts = name.split(".")
        ok = (re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", name) and 3 <= len(name) <= (222 if "." in name else 63)
              and all(0 < len(p) <= 63 for p in parts) and not _IP.match(name)
              and not name.startswith("goog") and "google" not in name and "g00gle" not in name)
        rule = "3-63 lower-case letters, digits, hyphens, underscores and dots, starting and ending with a letter or digit"
    if not ok:
        raise SetupInputError(f"--bucket {name!r} is not a {provider.upper()} bucket name ({rule}); "
                              "give the one bucket the nodes may use, e.g. my-tlcore-data")
    return name


def check_cluster_name(name: str, provider: str) -> str:
    """A cluster_name whose node names the provider accepts, and which no other name's nodes can match."""
    if provider == "gcp":
        # Ray names GCP VMs ray-<cluster>-{head,worker}-<8 hex>-compute: at most 63 characters,
        # lower-case letters, digits and hyphens
        ok = re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,42}[a-z0-9])?", name)
        rule = "1-44 lower-case letters, digits and hyphens, not starting or ending with a hyphen"
    else:
        # IAM role names <cluster>-head / -worker: at most 64 characters
        ok = re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9]{0,55}[A-Za-z0-9])?", name)
        rule = "1-57 letters, digits and hyphens, not starting or ending with a hyphen"
    if not ok:
        raise SetupInputError(f"--cluster-name {name!r}: {rule} (it is cluster_name in cluster/{provider}-gpu.yaml)")
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("provider", choices=["aws", "gcp"])
    p.add_argument("--ssh-cidr", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--cluster-name", required=True)
    a = p.parse_args(argv)
    try:
        print(check_cidr(a.ssh_cidr))
        check_bucket(a.bucket, a.provider)
        check_cluster_name(a.cluster_name, a.provider)
    except SetupInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
