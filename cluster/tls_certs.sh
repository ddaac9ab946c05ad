#!/usr/bin/env bash
# A private certificate authority for one cluster, and a certificate per node, for Ray's TLS
# (RAY_USE_TLS) and the MLflow server's HTTPS. Without TLS, Ray's token travels as gRPC metadata
# in clear text and MLflow's basic-auth password as Base64 on every request, over the cluster's LAN.
#
#   bash cluster/tls_certs.sh ~/tlcore-tls head 10.0.0.5            # the CA (once) and head.{crt,key}
#   bash cluster/tls_certs.sh ~/tlcore-tls worker1 10.0.0.6 gpu-7   # more names: IP addresses or host names
#
# Writes, in a mode-0700 folder, files only this user can read: ca.crt / ca.key (made on the first
# call; keep ca.key on the machine that makes certificates, never on the nodes), <node>.crt /
# <node>.key (valid for the names given, localhost and 127.0.0.1). Copy ca.crt, <node>.crt and
# <node>.key to each node (mode 0600), then set there, before `ray start` and in every driver's shell:
#
#   export RAY_USE_TLS=1 RAY_TLS_CA_CERT=~/tlcore-tls/ca.crt \
#          RAY_TLS_SERVER_CERT=~/tlcore-tls/<node>.crt RAY_TLS_SERVER_KEY=~/tlcore-tls/<node>.key
#
# A process without a certificate signed by this CA cannot reach the cluster's Ray (nor watch it).
# The MLflow server: MLFLOW_TLS_CERT / MLFLOW_TLS_KEY for mlflow/server.sh; clients set
# MLFLOW_TRACKING_SERVER_CERT_PATH=~/tlcore-tls/ca.crt and use https:// in --mlflow-uri.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 <folder> <node name> <IP or host name> [more names...]" >&2
  exit 2
fi
dir=$1 node=$2
shift 2
[[ "$node" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "node name $node: letters, digits, '.', '_', '-' only" >&2; exit 2; }
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
days=${TLCORE_TLS_DAYS:-825}
if [[ ! -s ca.key ]]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days 3650 -keyout ca.key -out ca.crt \
    -subj "/CN=tlcore cluster CA $(date +%Y-%m-%d)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "made the cluster CA: $PWD/ca.crt (ca.key stays here)"
fi
sans="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  [[ "$name" == 127.0.0.1 || "$name" == localhost ]] && continue
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done
openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$node.key" -out "$node.csr" -subj "/CN=$node" 2>/dev/null
# Ray uses one certificate as both server and client (mutual TLS): both usages
openssl x509 -req -in "$node.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 -out "$node.crt" \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n" "$sans") 2>/dev/null
rm -f "$node.csr"
echo "made $PWD/$node.crt and $node.key for $sans"
