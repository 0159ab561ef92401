# Sourced by the benchmark scripts. `own_broker NAME`: unless FLOWLOG_BENCH_KAFKA names a broker,
# starts a tansu broker of the benchmark's own (scripts/kafka, on a free port, data in a
# temporary directory, stopped and removed at exit) and exports FLOWLOG_BENCH_KAFKA, so that
# other users of a shared broker neither disturb the figures nor are disturbed.
own_broker() {
  local name="$1"
  [[ -z "${FLOWLOG_BENCH_KAFKA:-}" ]] || return 0
  broker_dir="$(mktemp -d /tmp/flowlog-bench-tansu.XXXXXX)"
  broker_port=""
  local candidate
  for candidate in $(shuf -i 20000-30000 -n 20); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
      broker_port="$candidate"
      break
    fi
  done
  [[ -n "$broker_port" ]] || { echo "$name: no free port for the broker" >&2; exit 1; }
  trap 'FLOWLOG_KAFKA_LISTEN="127.0.0.1:$broker_port" scripts/kafka stop "$broker_dir" >&2; rm -rf "$broker_dir"' EXIT
  FLOWLOG_KAFKA_LISTEN="127.0.0.1:$broker_port" scripts/kafka start "$broker_dir" >&2
  export FLOWLOG_BENCH_KAFKA="127.0.0.1:$broker_port"
}
