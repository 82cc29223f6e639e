# Builds the gateway and ascendctl; the runtime image holds only the binaries.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/ascend-gateway --create-home ascend
COPY --from=build /src/target/release/ascend-gateway /src/target/release/ascendctl /usr/local/bin/
USER ascend
WORKDIR /var/lib/ascend-gateway
ENV ASCEND_LISTEN=0.0.0.0:50051 \
    ASCEND_METRICS_LISTEN=0.0.0.0:9464 \
    ASCEND_DATA_DIR=/var/lib/ascend-gateway \
    ASCEND_LOG_FORMAT=json
EXPOSE 50051 9464
ENTRYPOINT ["ascend-gateway"]
CMD ["serve"]
