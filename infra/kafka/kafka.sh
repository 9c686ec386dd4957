#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller in one JVM) for llmpipe's
# tests and development. No Docker: the broker's jars come from Maven Central via
# infra/kafka/pom.xml and are cached; the broker listens on loopback only.
#
#   infra/kafka/kafka.sh fetch          resolve the broker jars into the cache (once)
#   infra/kafka/kafka.sh up             fetch if needed, format storage if needed, start, wait
#   infra/kafka/kafka.sh down           stop (SIGTERM, then SIGKILL after 30 s)
#   infra/kafka/kafka.sh status         exit 0 running, 2 process alive but port closed, 3 stopped
#   infra/kafka/kafka.sh logs [-f] [N]  last N (100) lines of the broker log; -f follows
#   infra/kafka/kafka.sh reset          down, then delete the data dir (topics, offsets, logs)
#
# Environment (all optional):
#   LLMPIPE_KAFKA_VERSION          Kafka version to run (default below)
#   LLMPIPE_KAFKA_PORT             PLAINTEXT listener port (9092)
#   LLMPIPE_KAFKA_CONTROLLER_PORT  KRaft controller port (PORT + 1)
#   LLMPIPE_KAFKA_HOME             jar cache (~/.cache/llmpipe/kafka-VERSION); jars in HOME/libs
#   LLMPIPE_KAFKA_DATA             config, logs, pid file and log.dirs (~/.cache/llmpipe/kafka-data)
#   LLMPIPE_KAFKA_HEAP             JVM heap options ("-Xms512m -Xmx2g")
#   LLMPIPE_KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (180; a broker that
#                                  exits is reported at once, this bounds one that hangs: 4 s idle,
#                                  over 60 s on a loaded 2-core CI machine on 2026-12-03)
#
# Secured listeners, beside the PLAINTEXT one (which the readiness probe and the broker
# itself keep using); for tests of llmpipe's Kafka security settings:
#   LLMPIPE_KAFKA_TLS_DIR          directory with ca.pem (the CA clients must present
#                                  certificates from), broker.pem (the broker's certificate
#                                  and chain) and broker.key (its unencrypted PKCS#8 key)
#   LLMPIPE_KAFKA_SSL_PORT         an SSL listener that requires a client certificate (mTLS)
#   LLMPIPE_KAFKA_SASL_SSL_PORT    a SASL_SSL listener: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
#   LLMPIPE_KAFKA_SASL_USERS       user:password[,user:password...]: PLAIN users, and SCRAM
#                                  credentials (both hashes) written by Kafka's StorageTool
#                                  when the data dir is formatted
#   LLMPIPE_KAFKA_OAUTH_JWKS       a JWKS file: the SASL_SSL listener also takes OAUTHBEARER
#                                  tokens (JWTs) signed by one of its keys
set -euo pipefail

readonly DEFAULT_KAFKA_VERSION="4.3.1"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
readonly SCRIPT_DIR REPO_ROOT

KAFKA_VERSION="${LLMPIPE_KAFKA_VERSION:-${DEFAULT_KAFKA_VERSION}}"
KAFKA_PORT="${LLMPIPE_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${LLMPIPE_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_HOME="${LLMPIPE_KAFKA_HOME:-${HOME}/.cache/llmpipe/kafka-${KAFKA_VERSION}}"
KAFKA_DATA="${LLMPIPE_KAFKA_DATA:-${HOME}/.cache/llmpipe/kafka-data}"
KAFKA_HEAP="${LLMPIPE_KAFKA_HEAP:--Xms512m -Xmx2g}"
START_TIMEOUT="${LLMPIPE_KAFKA_START_TIMEOUT:-180}"
readonly KAFKA_VERSION KAFKA_PORT CONTROLLER_PORT KAFKA_HOME KAFKA_DATA KAFKA_HEAP START_TIMEOUT
TLS_DIR="${LLMPIPE_KAFKA_TLS_DIR:-}"
SSL_PORT="${LLMPIPE_KAFKA_SSL_PORT:-}"
SASL_SSL_PORT="${LLMPIPE_KAFKA_SASL_SSL_PORT:-}"
SASL_USERS="${LLMPIPE_KAFKA_SASL_USERS:-}"
OAUTH_JWKS="${LLMPIPE_KAFKA_OAUTH_JWKS:-}"
readonly TLS_DIR SSL_PORT SASL_SSL_PORT SASL_USERS OAUTH_JWKS

readonly HOST="127.0.0.1"
readonly BOOTSTRAP="${HOST}:${KAFKA_PORT}"
readonly LIBS="${KAFKA_HOME}/libs"
readonly FETCH_MARKER="${KAFKA_HOME}/.fetched"
readonly POM="${SCRIPT_DIR}/pom.xml"
readonly PROPS="${KAFKA_DATA}/server.properties"
readonly LOG4J_CONF="${KAFKA_DATA}/log4j2.properties"
readonly LOG_DIR="${KAFKA_DATA}/logs"
readonly SERVER_LOG="${LOG_DIR}/server.log"
readonly STDOUT_LOG="${LOG_DIR}/stdout.log"
readonly KRAFT_DIR="${KAFKA_DATA}/kraft-combined-logs"
readonly PID_FILE="${KAFKA_DATA}/kafka.pid"
readonly VERSION_FILE="${KAFKA_DATA}/kafka.version"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
    printf '%s\n' "${JAVA_HOME}/bin/java"
  elif command -v java >/dev/null 2>&1; then
    command -v java
  else
    die "java not found (Kafka ${KAFKA_VERSION} needs Java 17+); install a JDK or set JAVA_HOME"
  fi
}

python_bin() {
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    printf '%s\n' "${REPO_ROOT}/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then
    command -v python3
  else
    die "python3 not found (needed for the readiness probe)"
  fi
}

now_ms() { date +%s%3N; }
# Seconds since $1 (from now_ms), one decimal.
elapsed() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

# Serialise fetch/up/down across concurrent callers (e.g. parallel test workers).
# fd 8 guards the jar cache, fd 9 the data dir; both are closed for the broker JVM so
# that it never inherits a lock.
lock_cache() {
  mkdir -p "${KAFKA_HOME}"
  exec 8>"${KAFKA_HOME}/.lock"
  flock -w 600 8 || die "timed out waiting for lock ${KAFKA_HOME}/.lock"
}
lock_data() {
  mkdir -p "${KAFKA_DATA}"
  exec 9>"${KAFKA_DATA}/.lock"
  flock -w 300 9 || die "timed out waiting for lock ${KAFKA_DATA}/.lock"
}

fetch_stamp() {
  printf 'kafka=%s pom=%s\n' "${KAFKA_VERSION}" "$(sha256sum "${POM}" | cut -d' ' -f1)"
}

is_fetched() {
  [[ -f "${FETCH_MARKER}" && "$(cat "${FETCH_MARKER}")" == "$(fetch_stamp)" ]]
}

cmd_fetch() {
  is_fetched && return 0
  lock_cache
  is_fetched && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found: install Maven to fetch the Kafka jars"
  log "resolving Kafka ${KAFKA_VERSION} jars from Maven Central into ${LIBS}"
  local start tmp
  start="$(now_ms)"
  tmp="${KAFKA_HOME}/libs.tmp.$$"
  rm -rf "${tmp}"
  mkdir -p "${tmp}"
  if ! mvn -q -B -Dstyle.color=never -f "${POM}" dependency:copy-dependencies \
      -Dkafka.version="${KAFKA_VERSION}" -DincludeScope=runtime \
      -DoutputDirectory="${tmp}" >"${KAFKA_HOME}/fetch.log" 2>&1; then
    tail -n 40 "${KAFKA_HOME}/fetch.log" >&2
    rm -rf "${tmp}"
    die "mvn could not resolve org.apache.kafka:kafka_2.13:${KAFKA_VERSION} (log: ${KAFKA_HOME}/fetch.log)"
  fi
  [[ -f "${tmp}/kafka_2.13-${KAFKA_VERSION}.jar" ]] || die "kafka_2.13-${KAFKA_VERSION}.jar missing after resolve"
  rm -rf "${LIBS}"
  mv "${tmp}" "${LIBS}"
  fetch_stamp >"${FETCH_MARKER}"
  log "fetched $(find "${LIBS}" -name '*.jar' | wc -l) jars ($(du -sh "${LIBS}" | cut -f1)) in $(elapsed "${start}")s"
}

# PID of our broker if it is alive, else nothing. A PID file whose process is gone, or
# belongs to something other than this data dir's broker, counts as stale.
running_pid() {
  [[ -f "${PID_FILE}" ]] || return 0
  local pid
  pid="$(cat "${PID_FILE}" 2>/dev/null || true)"
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 0
  kill -0 "${pid}" 2>/dev/null || return 0
  # /proc/PID/cmdline is NUL-separated; match our main class and our own properties file.
  if tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qF "kafka.Kafka ${PROPS}"; then
    printf '%s\n' "${pid}"
  fi
}

running_version() { cat "${VERSION_FILE}" 2>/dev/null || echo unknown; }

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/${HOST}/$1" 2>/dev/null
}

probe() {
  "$(python_bin)" "${SCRIPT_DIR}/probe.py" "${BOOTSTRAP}" --timeout 5
}

# The listener lines, and the TLS and SASL settings of the secured listeners if asked for.
listeners_config() {
  local listeners="PLAINTEXT://${HOST}:${KAFKA_PORT}" advertised="PLAINTEXT://${HOST}:${KAFKA_PORT}"
  local map="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ -n "${SSL_PORT}" ]]; then
    listeners+=",SSL://${HOST}:${SSL_PORT}"
    advertised+=",SSL://${HOST}:${SSL_PORT}"
    map+=",SSL:SSL"
  fi
  if [[ -n "${SASL_SSL_PORT}" ]]; then
    listeners+=",SASL_SSL://${HOST}:${SASL_SSL_PORT}"
    advertised+=",SASL_SSL://${HOST}:${SASL_SSL_PORT}"
    map+=",SASL_SSL:SASL_SSL"
  fi
  printf 'listeners=%s,CONTROLLER://%s:%s\n' "${listeners}" "${HOST}" "${CONTROLLER_PORT}"
  printf 'advertised.listeners=%s\n' "${advertised}"
  printf 'listener.security.protocol.map=%s\n' "${map}"
  [[ -n "${SSL_PORT}${SASL_SSL_PORT}" ]] || return 0
  [[ -n "${TLS_DIR}" ]] || die "LLMPIPE_KAFKA_SSL_PORT/SASL_SSL_PORT need LLMPIPE_KAFKA_TLS_DIR"
  local f
  for f in ca.pem broker.pem broker.key; do
    [[ -s "${TLS_DIR}/${f}" ]] || die "${TLS_DIR}/${f} missing (LLMPIPE_KAFKA_TLS_DIR)"
  done
  # Kafka reads PEM directly: the key store is one file with the key, then the chain.
  cat "${TLS_DIR}/broker.key" "${TLS_DIR}/broker.pem" >"${KAFKA_DATA}/broker-keystore.pem"
  chmod 600 "${KAFKA_DATA}/broker-keystore.pem"
  cat <<EOF

# Secured listeners (LLMPIPE_KAFKA_TLS_DIR=${TLS_DIR}).
ssl.keystore.type=PEM
ssl.keystore.location=${KAFKA_DATA}/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=${TLS_DIR}/ca.pem
EOF
  if [[ -n "${SSL_PORT}" ]]; then
    printf 'listener.name.ssl.ssl.client.auth=required\n'
  fi
  if [[ -n "${SASL_SSL_PORT}" ]]; then
    local jaas="org.apache.kafka.common.security.plain.PlainLoginModule required" pair pairs=()
    IFS=',' read -r -a pairs <<<"${SASL_USERS}"
    for pair in "${pairs[@]}"; do
      jaas+=" user_${pair%%:*}=\"${pair#*:}\""
    done
    local mechanisms="PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    [[ -z "${OAUTH_JWKS}" ]] || mechanisms+=",OAUTHBEARER"
    cat <<EOF
sasl.enabled.mechanisms=${mechanisms}
listener.name.sasl_ssl.ssl.client.auth=none
listener.name.sasl_ssl.plain.sasl.jaas.config=${jaas};
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    if [[ -n "${OAUTH_JWKS}" ]]; then
      [[ -s "${OAUTH_JWKS}" ]] || die "${OAUTH_JWKS} missing (LLMPIPE_KAFKA_OAUTH_JWKS)"
      cat <<EOF
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
listener.name.sasl_ssl.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
listener.name.sasl_ssl.oauthbearer.sasl.oauthbearer.jwks.endpoint.url=file://${OAUTH_JWKS}
EOF
    fi
  fi
}

# StorageTool arguments that store SCRAM credentials for LLMPIPE_KAFKA_SASL_USERS.
scram_args() {
  [[ -n "${SASL_USERS}" ]] || return 0
  local pair mechanism pairs=()
  IFS=',' read -r -a pairs <<<"${SASL_USERS}"
  for pair in "${pairs[@]}"; do
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      printf '%s\n' --add-scram "${mechanism}=[name=${pair%%:*},password=${pair#*:}]"
    done
  done
}

write_config() {
  mkdir -p "${LOG_DIR}" "${KRAFT_DIR}"
  local listeners
  listeners="$(listeners_config)"
  cat >"${PROPS}" <<EOF
# Generated by infra/kafka/kafka.sh on every 'up'; edits are overwritten.
# Single-node KRaft: one JVM is both broker and controller, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@${HOST}:${CONTROLLER_PORT}
${listeners}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=${KRAFT_DIR}

# Topics are created explicitly by the code and the tests.
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=1
default.replication.factor=1
min.insync.replicas=1

# Internal topics on a single node; fewer partitions than the default 50 keep the
# first consumer group / transaction fast on a small machine.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# After an unclean stop (SIGKILL, crash) the restarted node must wait for its old
# registration's lease to expire before it is unfenced: 9 s by default, 4 s here.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Sized for a 2-core machine shared with the tests.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
  cat >"${LOG4J_CONF}" <<EOF
# Generated by infra/kafka/kafka.sh. Broker log goes to ${SERVER_LOG}.
status = warn
name = llmpipe-kafka
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = ${SERVER_LOG}
appender.server.filePattern = ${SERVER_LOG}.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 20MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
EOF
}

java_opts() {
  # shellcheck disable=SC2206  # LLMPIPE_KAFKA_HEAP is a list of JVM flags on purpose
  JAVA_OPTS=(${KAFKA_HEAP}
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=${LOG4J_CONF}" "-Dkafka.logs.dir=${LOG_DIR}")
  # Kafka only reads OAuth URLs it is told it may (here: the JWKS file).
  [[ -z "${OAUTH_JWKS}" ]] || JAVA_OPTS+=("-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=file://${OAUTH_JWKS}")
}

format_storage() {
  [[ -f "${KRAFT_DIR}/meta.properties" ]] && return 0
  local cluster_id start
  # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding; like
  # Kafka's own generator, avoid a leading '-' that a CLI could take for an option.
  cluster_id="-"
  while [[ "${cluster_id}" == -* ]]; do
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
  done
  log "formatting ${KRAFT_DIR} (cluster id ${cluster_id})"
  start="$(now_ms)"
  java_opts
  local scram=()
  mapfile -t scram < <(scram_args)
  if ! "$(java_bin)" "${JAVA_OPTS[@]}" -cp "${LIBS}/*" kafka.tools.StorageTool \
      format -t "${cluster_id}" -c "${PROPS}" "${scram[@]}" >"${LOG_DIR}/format.log" 2>&1; then
    cat "${LOG_DIR}/format.log" >&2
    die "formatting storage failed"
  fi
  log "formatted in $(elapsed "${start}")s"
}

show_logs_tail() {
  local f
  for f in "${STDOUT_LOG}" "${SERVER_LOG}"; do
    [[ -s "${f}" ]] || continue
    log "---- last lines of ${f} ----"
    tail -n 40 "${f}" >&2
  done
}

# Wait until our broker answers a Metadata request; $1 = launch time (ms), $2 = PID.
# On timeout the broker is stopped, so that the next 'up' starts afresh.
wait_ready() {
  local start="$1" pid="$2" deadline probe_err
  deadline=$(($(now_ms) + START_TIMEOUT * 1000))
  probe_err="${LOG_DIR}/probe.err"
  while (($(now_ms) < deadline)); do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      show_logs_tail
      die "broker process ${pid} exited during startup"
    fi
    if port_open "${KAFKA_PORT}" && probe >/dev/null 2>"${probe_err}"; then
      return 0
    fi
    sleep 0.1
  done
  show_logs_tail
  if [[ -s "${probe_err}" ]]; then log "last probe: $(cat "${probe_err}")"; fi
  log "broker (pid ${pid}) did not answer on ${BOOTSTRAP} within ${START_TIMEOUT}s; stopping it"
  stop_pid "${pid}"
  die "broker did not start within ${START_TIMEOUT}s (LLMPIPE_KAFKA_START_TIMEOUT); full log: ${SERVER_LOG}"
}

# SIGTERM (controlled shutdown), SIGKILL after 30 s; removes the pid file.
stop_pid() {
  local pid="$1" deadline
  kill -TERM "${pid}" 2>/dev/null || true
  deadline=$(($(now_ms) + 30000))
  while kill -0 "${pid}" 2>/dev/null && (($(now_ms) < deadline)); do
    sleep 0.1
  done
  if kill -0 "${pid}" 2>/dev/null; then
    log "pid ${pid} still alive after 30s, sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
    while kill -0 "${pid}" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "${PID_FILE}"
}

cmd_up() {
  lock_data
  local pid start
  pid="$(running_pid)"
  if [[ -n "${pid}" ]]; then
    start="$(now_ms)"
    wait_ready "${start}" "${pid}"
    log "already running: ${BOOTSTRAP} (pid ${pid}, Kafka $(running_version))"
    if [[ "$(running_version)" != "${KAFKA_VERSION}" ]]; then
      log "warning: Kafka ${KAFKA_VERSION} was asked for; run '$0 down' first to switch"
    fi
    return 0
  fi
  if [[ -f "${PID_FILE}" ]]; then
    log "removing stale pid file ${PID_FILE}"
    rm -f "${PID_FILE}"
  fi
  if port_open "${KAFKA_PORT}"; then
    die "port ${KAFKA_PORT} is already in use by another process (not this data dir's broker); set LLMPIPE_KAFKA_PORT"
  fi
  if port_open "${CONTROLLER_PORT}"; then
    die "controller port ${CONTROLLER_PORT} is already in use; set LLMPIPE_KAFKA_CONTROLLER_PORT"
  fi
  cmd_fetch
  write_config
  format_storage
  java_opts
  local java
  java="$(java_bin)"
  : >"${STDOUT_LOG}"
  printf '%s\n' "${KAFKA_VERSION}" >"${VERSION_FILE}"
  start="$(now_ms)"
  # setsid: own session, so the broker outlives the calling shell's process group.
  # The inner shell writes its own PID ($0 is the pid file) and then execs java,
  # which keeps that PID.
  # shellcheck disable=SC2016  # $$, $0 and $@ are expanded by the inner shell
  setsid nohup bash -c 'echo "$$" >"$0"; exec "$@"' "${PID_FILE}" \
    "${java}" "${JAVA_OPTS[@]}" -cp "${LIBS}/*" kafka.Kafka "${PROPS}" \
    >>"${STDOUT_LOG}" 2>&1 </dev/null 8>&- 9>&- &
  local i=0
  until [[ -s "${PID_FILE}" ]]; do
    ((++i <= 100)) || die "broker launcher did not write ${PID_FILE}"
    sleep 0.05
  done
  pid="$(cat "${PID_FILE}")"
  log "started Kafka ${KAFKA_VERSION} (pid ${pid}), waiting up to ${START_TIMEOUT}s for ${BOOTSTRAP}"
  wait_ready "${start}" "${pid}"
  log "up: ${BOOTSTRAP} answering after $(elapsed "${start}")s (pid ${pid}, data ${KAFKA_DATA})"
  # Best effort: have the group coordinator (__consumer_offsets) ready before the first
  # consumer group needs it. Not fatal: the clients retry on their own.
  if ! "$(python_bin)" "${SCRIPT_DIR}/probe.py" "${BOOTSTRAP}" --timeout 15 --warm-up \
      >/dev/null 2>"${LOG_DIR}/probe.err"; then
    log "warning: group coordinator warm-up failed: $(cat "${LOG_DIR}/probe.err")"
  fi
}

cmd_down() {
  if [[ ! -d "${KAFKA_DATA}" ]]; then
    log "not running (no ${KAFKA_DATA})"
    return 0
  fi
  lock_data
  local pid start
  pid="$(running_pid)"
  if [[ -z "${pid}" ]]; then
    rm -f "${PID_FILE}"
    log "not running"
    return 0
  fi
  start="$(now_ms)"
  stop_pid "${pid}"
  log "stopped pid ${pid} in $(elapsed "${start}")s"
}

cmd_status() {
  local pid
  pid="$(running_pid)"
  if [[ -z "${pid}" ]]; then
    echo "stopped (bootstrap ${BOOTSTRAP}, data ${KAFKA_DATA})"
    return 3
  fi
  if port_open "${KAFKA_PORT}"; then
    echo "running pid=${pid} bootstrap=${BOOTSTRAP} version=$(running_version) data=${KAFKA_DATA}"
    return 0
  fi
  echo "starting pid=${pid} bootstrap=${BOOTSTRAP} (process alive, port not accepting yet)"
  return 2
}

cmd_logs() {
  local follow=() lines=100 arg
  for arg in "$@"; do
    case "${arg}" in
      -f) follow=(-F) ;;
      *[!0-9]* | '') die "usage: $0 logs [-f] [LINES]" ;;
      *) lines="${arg}" ;;
    esac
  done
  [[ -f "${SERVER_LOG}" ]] || die "no log yet at ${SERVER_LOG}"
  tail -n "${lines}" "${follow[@]}" "${SERVER_LOG}"
}

cmd_reset() {
  cmd_down
  [[ -d "${KAFKA_DATA}" ]] || return 0
  # Refuse to delete a directory that this script did not set up.
  if ! grep -qs '^# Generated by infra/kafka/kafka.sh' "${PROPS}"; then
    die "${KAFKA_DATA} has no server.properties written by kafka.sh; not deleting it"
  fi
  rm -rf "${KAFKA_DATA}"
  log "deleted ${KAFKA_DATA}"
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "${cmd}" in
    fetch) cmd_fetch ;;
    up | start) cmd_up ;;
    down | stop) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    reset) cmd_reset ;;
    *)
      echo "usage: $0 fetch|up|down|status|logs [-f] [LINES]|reset" >&2
      exit 64
      ;;
  esac
}

main "$@"
