# sluice as a container (a sidecar next to your app). Build: docker build -t sluice .
# Run:   docker run -p 127.0.0.1:8787:8787 -e DEEPSEEK_API_KEY=sk-... sluice
# See examples/docker-compose.yml for the sidecar setup with a Docker secret.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin sluice

# Runtime: glibc, CA certificates and a non-root user (65532), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config/sluice.toml /etc/sluice/sluice.toml
# Inside a container, listen on every interface; publish the port only where apps can reach it.
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml \
    SLUICE_SERVER__LISTEN=0.0.0.0:8787
USER 65532:65532
EXPOSE 8787
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["/usr/local/bin/sluice", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run"]
