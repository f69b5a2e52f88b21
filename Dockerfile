# steerling: build the release binary, then a slim runtime image with the
# default model fetched at build time (the same `steerling fetch-model` the
# README and CI use).
#
# Every RUN step is a script in .ci/image; CI runs the same scripts outside a
# container (.ci/image/check.sh), so the image cannot rot unseen.
#
# The binary is built for the build machine's CPU (.cargo/config.toml sets
# target-cpu=native, which the quantized kernels need for speed): build the
# image on the kind of machine that will run it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN bash .ci/image/build.sh
RUN bash .ci/image/install.sh /out

FROM debian:bookworm-slim
COPY --from=build /out/ /
RUN /usr/local/lib/steerling/runtime-deps.sh
RUN /usr/local/lib/steerling/add-user.sh
USER steerling
# Every flag is also an environment variable (see README, "Flags").
ENV STEERLING_HOME=/home/steerling/.cache/steerling \
    STEERLING_HOST=0.0.0.0 \
    STEERLING_PORT=8080 \
    STEERLING_ADAPTERS=/var/lib/steerling/adapters
RUN steerling fetch-model
VOLUME /var/lib/steerling/adapters
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["/usr/local/lib/steerling/healthcheck.sh"]
ENTRYPOINT ["steerling"]
CMD ["serve"]
