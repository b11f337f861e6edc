# syntax=docker/dockerfile:1
#
# Two images from one build:
#   docker build -t ghcr.io/kube-prefetch/kube-prefetch:0.1.0 .
#   docker build --target noop -t ghcr.io/kube-prefetch/kube-prefetch-noop:0.1.0 .
# Multi-arch (the helper must exist for every node architecture):
#   docker buildx build --platform linux/amd64,linux/arm64 [--target noop] ...
# Each platform is built natively or under emulation, so no cross toolchain
# is needed. See deploy/README.md.

# ---- builder: both binaries, release profile, exactly the locked deps ----
FROM rust:1-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and build artefacts between builds;
# they are not part of the image, so the binaries are copied out to /out.
# build.rs links kube-prefetch-noop statically against glibc's archives
# (libc6-dev, present in this image); the check below fails the build if the
# helper ever comes out dynamic, as it would then not run in scratch images.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kube-prefetch --bin kube-prefetch-noop \
    && mkdir -p /out \
    && cp target/release/kube-prefetch target/release/kube-prefetch-noop /out/ \
    && if readelf --program-headers --dynamic /out/kube-prefetch-noop | grep -E 'INTERP|\(NEEDED\)'; then \
         echo "kube-prefetch-noop is not statically linked" >&2; exit 1; \
       fi \
    && /out/kube-prefetch-noop

# ---- noop: the helper image for pull pods' init container ----
# Holds nothing but the static binary; the init container runs
# `/kube-prefetch-noop install /kube-prefetch/noop` to copy it into an emptyDir.
FROM scratch AS noop
COPY --from=builder /out/kube-prefetch-noop /kube-prefetch-noop
USER 65532:65532
ENTRYPOINT ["/kube-prefetch-noop"]

# ---- runtime: the kube-prefetch orchestrator (default target) ----
# distroless/cc: glibc and libgcc for the dynamically linked main binary, CA
# certificates for the API servers' TLS, no shell; "nonroot" runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/kube-prefetch /usr/local/bin/kube-prefetch
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kube-prefetch"]
CMD ["run", "--config", "/etc/kube-prefetch/kube-prefetch.toml"]
