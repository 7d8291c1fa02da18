# LightShark-mini image: build stage with the eBPF toolchain of
# ../shared/notes/ebpf-toolchain.md, small runtime stage with the binary.

FROM rust:1.95-bookworm AS build
# The dated nightly whose LLVM (22) bpf-linker is built against.
ARG EBPF_TOOLCHAIN=nightly-2026-05-19
ENV LIGHTSHARK_EBPF_TOOLCHAIN=${EBPF_TOOLCHAIN} \
    LLVM_PREFIX=/usr/lib/llvm-22
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install "${EBPF_TOOLCHAIN}" --profile minimal --component rust-src \
 && cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release -p lightshark \
 && install -D -m 0755 target/release/lightshark-mini /out/lightshark-mini

FROM debian:bookworm-slim
# The agent runs as this unprivileged user; the capabilities it needs
# (CAP_BPF, CAP_NET_ADMIN) are granted by the runtime (see deploy/).
RUN groupadd --system --gid 10001 lightshark \
 && useradd --system --uid 10001 --gid lightshark --home-dir /var/lib/lightshark \
      --shell /usr/sbin/nologin lightshark \
 && install -d -o lightshark -g lightshark -m 0750 /var/lib/lightshark /data
COPY --from=build /out/lightshark-mini /app/lightshark-mini
COPY deploy/entrypoint.sh /app/entrypoint.sh
# Permitted (not effective) file capabilities: a non-root user can then use
# CAP_BPF and CAP_NET_ADMIN when, and only when, the runtime grants them;
# the agent raises them itself and names any the runtime withheld.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin \
 && setcap cap_bpf,cap_net_admin=p /app/lightshark-mini \
 && apt-get purge -y libcap2-bin \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
# The default traffic.db goes to the working directory, which is writable.
WORKDIR /var/lib/lightshark
USER 10001:10001
EXPOSE 3000
ENTRYPOINT ["/app/entrypoint.sh"]
CMD []
