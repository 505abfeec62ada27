# syntax=docker/dockerfile:1
# neuronetz-gateway: the one-file shiv binary on distroless Python (Debian 13, Python 3.13).
#
#   docker build -t neuronetz-gateway .
#   docker run --read-only -v "$PWD:/app" neuronetz-gateway            # serve on 0.0.0.0:8080
#   docker exec neuronetz-gateway neuronetz-gateway create-key ...      # admin commands, same binary
#
# tests/test_deployment.py runs the stages of this file without a Docker engine: the build
# stage's RUN lines in a debootstrapped debian:13 root, the runtime stage's COPY lines into a
# root holding exactly distroless python3-debian13's packages, then `serve` and an admin
# command as uid 10001 on a read-only root. Keep the two in step: the test reads this file.

# The build stage must be the runtime's Debian release with Debian's own python3: wheels and
# environment markers are chosen by the interpreter that installs them (redis needs
# async-timeout below 3.11.3; a cp311 build misses `_cffi_backend` on 3.12), so the binary is
# built by the very /usr/bin/python3 (3.13) that distroless python3-debian13 runs it with.
FROM debian:13-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# distroless python3 ships the standard library without .pyc files (distroless#865), so every
# process -- serve, each admin command, each HEALTHCHECK -- would first compile some 600
# modules in memory: 0.4 s of CPU each time. Compile them here; the runtime stage copies only
# the __pycache__ directories over distroless's sources. checked-hash .pyc files are used
# only while the source is byte-identical, so if the two images' python3.13 ever differ this
# costs speed, never correctness.
RUN python3 -m compileall -q -f -j 0 --invalidation-mode checked-hash /usr/lib/python3.13 \
 && mkdir -p /image/stdlib \
 && cd /usr/lib/python3.13 \
 && find . -path '*/__pycache__/*.pyc' | tar -cf - -T - | tar -xf - -C /image/stdlib
WORKDIR /src
COPY pyproject.toml build.py README.md LICENSE ./
COPY migrations/ migrations/
COPY neuronetz/ neuronetz/
# --python: distroless has no /usr/bin/env, so the shebang names the interpreter itself.
# --root:   shiv extracts into a fixed directory baked into the binary; build.py's closing
#           `selfcheck` extracts it here (with .pyc files; extraction needs /dev/shm), so the
#           runtime never writes: a read-only root filesystem works.
# --output: shiv's extraction directory is keyed by the binary's file name, so the binary is
#           built under the very path and name it has in the runtime image (a renamed binary
#           would try to extract again and fail on the read-only root).
RUN python3 build.py --python /usr/bin/python3 --root /opt/neuronetz --output /usr/local/bin/neuronetz-gateway
# The .pyc files written at extraction are validated against the sources' mtimes; recompile
# them as unchecked-hash so they stay valid whatever a COPY does to timestamps (otherwise
# every start on the read-only root would compile everything again, about 0.9 s per process).
RUN python3 -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/neuronetz
# The runtime image's users: distroless's own (root, nobody, nonroot) plus `gateway`, 10001,
# so that nothing runs as root and the uid is not shared with any other image's "nonroot".
RUN mkdir -p /image/etc \
 && printf '%s\n' \
      'root:x:0:0:root:/root:/sbin/nologin' \
      'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' \
      'gateway:x:10001:10001:neuronetz-gateway:/nonexistent:/sbin/nologin' > /image/etc/passwd \
 && printf '%s\n' \
      'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' \
      'gateway:x:10001:' > /image/etc/group

FROM gcr.io/distroless/python3-debian13
COPY --from=build /image/etc/passwd /image/etc/group /etc/
COPY --from=build /image/stdlib/ /usr/lib/python3.13/
COPY --from=build /opt/neuronetz /opt/neuronetz
COPY --from=build /usr/local/bin/neuronetz-gateway /usr/local/bin/neuronetz-gateway
# The gateway reads ./.env: compose mounts the directory holding it at /app (a directory, not
# the single file, so edits on the host and `add-backend` renames are seen live).
WORKDIR /app
# Listening on loopback inside a container is useless; every other setting comes from the
# environment or /app/.env (GATEWAY_PORT is deliberately not set here: .env may change it).
ENV GATEWAY_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/neuronetz-gateway"]
CMD ["serve"]
# distroless has no curl or shell: the binary checks its own /healthz (on GATEWAY_PORT).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/neuronetz-gateway", "healthcheck"]
