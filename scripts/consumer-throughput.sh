#!/usr/bin/env bash
# Usage: cargo build --release && scripts/consumer-throughput.sh   (N=100000 LEVEL=warn EXTRA="VAR=value" to vary; needs kcat and bc)
# Throughput of `courier consumer` with the log processor over N messages.
set -euo pipefail
B=${B:-target/release/courier}
N=${N:-100000}
LEVEL=${LEVEL:-warn}
export LOG_FORMAT=json
export RDKAFKA_SESSION_TIMEOUT_MS=6000
rm -f ${TMPDIR:-/tmp}/courier-measure-bootstrap
$B dev-broker --bootstrap-file ${TMPDIR:-/tmp}/courier-measure-bootstrap >/dev/null 2>&1 & DB=$!
trap 'kill $DB 2>/dev/null' EXIT
for i in $(seq 50); do [ -s ${TMPDIR:-/tmp}/courier-measure-bootstrap ] && break; sleep 0.1; done
BS=$(cat ${TMPDIR:-/tmp}/courier-measure-bootstrap)
t0=$(date +%s.%N)
KAFKA_BROKERS=$BS HTTP_ADDR=127.0.0.1:0 OPS_ADDR=127.0.0.1:0 LOG_LEVEL=warn $B producer --generate --rate 200000 --count $N
t1=$(date +%s.%N)
echo "produced $N in $(echo "$t1 - $t0" | bc) s"
env KAFKA_BROKERS=$BS OPS_ADDR=127.0.0.1:19199 LOG_LEVEL=$LEVEL KAFKA_CONSUMER_GROUP_ID=measure ${EXTRA:-} $B consumer > ${TMPDIR:-/tmp}/courier-measure-consumer.log 2>&1 & C=$!
first=""; idle=0; last=""; last_change="" 
while true; do
  n=$(curl -s localhost:19199/metrics 2>/dev/null | awk '/^courier_messages_processed_total/ {s+=$2} END {print s+0}')
  now=$(date +%s.%N)
  if [ -z "$first" ] && [ "$n" -gt 0 ]; then first=$now; firstn=$n; fi
  if [ -n "$first" ] && [ "$n" = "${last:-}" ]; then idle=$((idle+1)); else idle=0; last_change=$now; fi
  last=$n
  if [ "$idle" -ge 40 ]; then break; fi
  sleep 0.05
done
kill -TERM $C; wait $C || true
retained=$(timeout 60 kcat -C -b $BS -t events -o beginning -e -q -f '.\n' 2>/dev/null | wc -l)
echo "retained by the broker: $retained; processed $n; rate $(echo "($n - $firstn) / ($last_change - $first)" | bc) msg/s over $(echo "$last_change - $first" | bc) s (LOG_LEVEL=$LEVEL)"
