"""Which entries of a Ray cluster's GCS key-value store (function table, job records, sessions,
...) hold a secret: `python tests/gcs_kv_search.py <address>`, the secret on stdin (never argv).
Prints `scanned N entries` and one `found <namespace> <key>` line per entry that holds it; exit 0.
Used by the team-path tests: whoever holds the cluster token can read every entry.
"""

import sys

import ray
import ray._private.ray_constants as ray_constants
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list


def namespaces() -> list:
    """Every namespace Ray names (KV_NAMESPACE_*), the default one (None) and the job namespaces."""
    names = {getattr(ray_constants, k) for k in dir(ray_constants) if k.startswith("KV_NAMESPACE_")}
    return [None, *sorted((n for n in names if n is not None), key=str), b"tune", b"ray_tune"]


def search(needle: bytes) -> tuple[int, list]:
    scanned, found = 0, []
    for ns in namespaces():
        for key in _internal_kv_list(b"", namespace=ns) or []:
            value = _internal_kv_get(key, namespace=ns) or b""
            scanned += 1
            if needle in value or needle in key:
                found.append((ns, key))
    return scanned, found


if __name__ == "__main__":
    secret = sys.stdin.readline().rstrip("\n").encode()
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
    n, hits = search(secret)
    print(f"scanned {n} entries")
    for ns, key in hits:
        print("found", ns, key[:120])
