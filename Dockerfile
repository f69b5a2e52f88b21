# steerling: build the release binary, then a slim runtime image with the
# default model fetched at build time (the same `steerling fetch-model` the
# README and CI use).
#
# The binary is built for the build machine's CPU (.cargo/config.toml sets
# target-cpu=native, which the quantized kernels need for speed): build the
# image on the kind of machine that will run it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 steerling
COPY --from=build /src/target/release/steerling /usr/local/bin/steerling
COPY --chown=steerling adapters /var/lib/steerling/adapters
USER steerling
ENV STEERLING_HOME=/home/steerling/.cache/steerling \
    STEERLING_HOST=0.0.0.0 \
    STEERLING_PORT=8080 \
    STEERLING_ADAPTERS=/var/lib/steerling/adapters
RUN steerling fetch-model
VOLUME /var/lib/steerling/adapters
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD curl -fsS http://127.0.0.1:8080/ready || exit 1
ENTRYPOINT ["steerling"]
CMD ["serve"]
