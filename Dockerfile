# ambit image: the management plane (`ambit mgmt`), the node agent (`ambit agent`) and the edge gateway
# (`ambit gateway`), one image for all three.
# Build with `make image` (docker, podman or buildah). The node agent compiles its eBPF programs with bcc
# against the node's kernel headers, which the DaemonSet mounts from the host (/lib/modules, /usr/src).
FROM debian:12

ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /opt/ambit
COPY . .
# The same idempotent set-up as a developer's `make setup`, less the test bed (helm, kube-apiserver): the
# image runs ambit, it does not test it. Then drop what only the build needed.
RUN apt-get update -qq \
    && bash scripts/setup-system.sh \
    && make venv protos native gateway \
    && rm -rf /var/lib/apt/lists/* /root/.cache tests vagrant

ENTRYPOINT ["/opt/ambit/.venv/bin/ambit"]
