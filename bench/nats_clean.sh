# Sourced by the bench scripts that run nodes on NATS: `nats_delete_prefix URL PREFIX` deletes
# the history stream and the presence and transitions buckets a run under PREFIX created.
# Each history stream reserves JetStream storage (256 MB by default), so runs that leave theirs
# behind fill the server until it refuses new streams. Speaks the NATS protocol over bash's
# /dev/tcp (no client needed); bounded to a few seconds; errors are ignored (a run that never
# got as far as creating its stream leaves nothing to delete).
nats_delete_prefix() { # nats://[user:pass@]host:port PREFIX
  case "$1" in nats://*) ;; *) return 0 ;; esac
  local hostport=${1#nats://}
  hostport=${hostport##*@}
  hostport=${hostport%%/*}
  local host=${hostport%:*} port=${hostport##*:}
  (
    exec 3<>"/dev/tcp/$host/$port" || exit 0
    printf 'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.bench_clean 1\r\n' >&3
    for stream in "${2}_history" "KV_${2}_presence" "KV_${2}_transitions"; do
      printf 'PUB $JS.API.STREAM.DELETE.%s _INBOX.bench_clean 0\r\n\r\n' "$stream" >&3
    done
    # One answer per request (deleted, or "stream not found"), then the connection closes.
    timeout 5 awk '/^MSG / { if (++answers == 3) exit }' <&3 || true
    exec 3>&-
  ) 2>/dev/null || true
}
