# Ray's TLS for this node, when its certificate is installed (cluster/tls_certs.sh made it):
#   ${TLCORE_TLS_DIR:-~/.tlcore/tls}/{ca.crt,node.crt,node.key}
# Sourced before `ray start` (onprem.yaml's start commands) and by every shell that runs a driver
# (~/.bashrc), so that head, workers and drivers all speak TLS with certificates of one CA, and a
# process without one cannot join or watch the cluster. Without the files it does nothing.
_tlcore_tls="${TLCORE_TLS_DIR:-$HOME/.tlcore/tls}"
if [ -r "$_tlcore_tls/node.crt" ] && [ -r "$_tlcore_tls/node.key" ] && [ -r "$_tlcore_tls/ca.crt" ]; then
  export RAY_USE_TLS=1 RAY_TLS_CA_CERT="$_tlcore_tls/ca.crt" \
         RAY_TLS_SERVER_CERT="$_tlcore_tls/node.crt" RAY_TLS_SERVER_KEY="$_tlcore_tls/node.key"
fi
unset _tlcore_tls
