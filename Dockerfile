# syntax=docker/dockerfile:1
# Multi-stage build of the txbox binaries: txbox (CLI), txbox-relay and the
# example's two services, payments-example and ledger-example. Used by
# docker-compose.yml.

FROM rust:1-bookworm AS builder
# rdkafka builds librdkafka with make/gcc (already in the image); it needs
# OpenSSL and zlib headers. No cmake required.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Copy only the sources (keeps target/ and .txbox/ out of the build).
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY examples ./examples
COPY tests ./tests
COPY migrations ./migrations
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p txbox-cli -p txbox-relay -p payments-example \
 && mkdir -p /out \
 && cp target/release/txbox target/release/txbox-relay target/release/payments-example \
       target/release/ledger-example /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home txbox
COPY --from=builder /out/ /usr/local/bin/
COPY migrations /usr/local/share/txbox/migrations
USER txbox
ENV RUST_LOG=info
CMD ["txbox", "--help"]
