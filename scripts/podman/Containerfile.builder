# The build stage's base for registry-less builds (scripts/image): the
# debootstrapped Debian plus what rust:1.95-bookworm would bring for
# nicplug (a C toolchain, pkg-config, libvirt's headers) and this
# machine's Rust toolchain, mounted at /toolchain during the build.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /usr/local/rust \
 && cp -a /toolchain/bin /toolchain/lib /usr/local/rust/ \
 && if [ -d /toolchain/libexec ]; then cp -a /toolchain/libexec /usr/local/rust/; fi \
 && rm -rf /usr/local/rust/lib/rustlib/src /usr/local/rust/lib/rustlib/etc
ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/usr/local/cargo
