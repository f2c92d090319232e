# courier: one image for every subcommand (producer, consumer, topics, dlq, ...).
#
#   docker build -t courier .
#   docker run --rm -e KAFKA_BROKERS=broker:9092 courier producer
#
# Configuration comes from environment variables only; `courier config` prints the
# effective configuration with secrets redacted.

# ---------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# Build dependencies of `--features ssl`:
# - make, g++, perl: librdkafka's vendored build (mklove ./configure + make) and the
#   vendored OpenSSL build (its Configure script is Perl). cmake is not needed.
# - pkg-config, libsasl2-dev: the `sasl` feature links Cyrus SASL (GSSAPI/Kerberos)
#   dynamically; the runtime stage installs the matching libsasl2-2.
# Versions are not pinned (DL3008): they come from the same Debian release as the base
# image tag, and pinning exact Debian revisions breaks the build as soon as bookworm
# publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ perl pkg-config libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# 1. Dependencies only, cached in their own layer: this layer is rebuilt only when
#    Cargo.toml or Cargo.lock change, not when the sources do.
COPY Cargo.toml Cargo.lock ./
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Cargo.toml names bench targets explicitly, and cargo wants their files to exist even when
# it does not build them: stub them too, by name, so this layer still depends only on the
# manifest and the lock file.
RUN mkdir src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"/\1/p;}' Cargo.toml \
    | while read -r bench; do echo 'fn main() {}' > "benches/$bench.rs"; done \
 && cargo build --release --locked --features ssl \
 && rm -rf src benches \
           target/release/courier* \
           target/release/deps/courier-* \
           target/release/deps/libcourier-* \
           target/release/.fingerprint/courier-*

# 2. The real sources. The dummy crate's fingerprints were removed above, so cargo
#    rebuilds courier itself whatever the copied files' timestamps are.
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --features ssl \
 && install -D -m 0755 target/release/courier /out/courier \
 && strip --strip-debug /out/courier

# ---------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to brokers (SASL_SSL/SSL) and to the http processor's target.
# libsasl2-2: the Cyrus SASL library the binary is dynamically linked against
# (OpenSSL, zlib and librdkafka are linked statically).
# Versions not pinned, for the reason given in the builder stage (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libsasl2-2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 courier \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
            --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin courier

COPY --from=builder /out/courier /usr/local/bin/courier

# The vendored OpenSSL looks for CA certificates under its build-time OPENSSLDIR
# (/usr/local/ssl), which does not exist here. Point it at Debian's bundle, so TLS to the
# brokers verifies against the system CAs when KAFKA_SSL_CA_LOCATION is not set.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_DIR=/etc/ssl/certs

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# 8080: the producer's ingest API (HTTP_ADDR). 9090: /metrics, /healthz, /readyz of
# either service (OPS_ADDR).
EXPOSE 8080 9090

ENTRYPOINT ["courier"]
CMD ["consumer"]
