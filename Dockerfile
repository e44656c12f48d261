# Placeholder: the multi-stage image (builder with `cargo build --release --locked`, slim non-root
# runtime, HEALTHCHECK) arrives with the "Run it for real" issue.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
USER nobody
ENV SLUICE_SERVER__LISTEN=0.0.0.0:8787
EXPOSE 8787
ENTRYPOINT ["/usr/local/bin/sluice"]
