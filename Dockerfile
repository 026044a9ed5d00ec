# dicom-forwarder container image.
# Build:  docker build -t dicom-forwarder .
# Run:    see deploy/README.md ("Docker"); deploy/compose.yaml runs it next to an Orthanc PACS.

# The official slim Debian 12 Python image; pin it by digest (python:3.11-slim-bookworm@sha256:...)
# in production so a rebuild cannot change the base under you.
FROM python:3.11-slim-bookworm

# Image metadata (OCI annotations).
LABEL org.opencontainers.image.title="dicom-forwarder" \
      org.opencontainers.image.description="Watch folder -> durable outbox -> DICOM C-STORE to one or more peers" \
      org.opencontainers.image.licenses="MIT"

# Optional dependency groups from pyproject.toml to install: the decompression fallback for peers
# that refuse a compressed file's transfer syntax, the Prometheus endpoint (metrics.listen), and
# the per-destination transforms (de-identification, lossless compression).
# systemd is left out: a container has no journald or systemd to notify.
ARG EXTRAS="codecs,metrics,transform"

# No .pyc writes at run time (the venv is compiled at install and read-only to the user), logs
# unbuffered, the venv's `forwarder` first on PATH, and pip quiet about its version.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/forwarder/bin:${PATH}" \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A dedicated non-root user with a fixed uid/gid (10001), so host bind mounts can be chown'ed to it.
RUN groupadd --system --gid 10001 forwarder \
    && useradd --system --uid 10001 --gid forwarder --no-create-home \
       --home-dir /var/lib/forwarder --shell /usr/sbin/nologin forwarder

# The build happens in /src; nothing from it stays in the image.
WORKDIR /src

# Dependencies first, in their own layer: only pyproject.toml is copied, so editing the code does
# not reinstall pynetdicom, pydicom and the codecs.
COPY pyproject.toml /src/pyproject.toml

# A venv at /opt/forwarder (the same place as on a Debian host) holding the dependencies read
# from pyproject.toml: [project].dependencies plus the EXTRAS groups.
RUN python -m venv /opt/forwarder \
    && python -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ["EXTRAS"].split(",") if e]; deps = p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]; print("\n".join(d for d in deps if not d.startswith("dicom-forwarder")))' > /src/requirements.txt \
    && /opt/forwarder/bin/pip install --no-cache-dir -r /src/requirements.txt

# Then the code (.dockerignore lets only pyproject.toml, forwarder/ and the example config in).
COPY forwarder/ /src/forwarder/

# Install the package itself without touching the dependency layer, then drop the sources.
RUN /opt/forwarder/bin/pip install --no-cache-dir --no-deps /src \
    && rm -rf /src

# The default configuration; mount your own over /etc/forwarder/forwarder.toml, or override single
# settings with FORWARDER_... variables (below, and `docker run -e`).
COPY config/forwarder.toml /etc/forwarder/forwarder.toml

# Every command finds that file through FORWARDER_CONFIG, so `docker exec CONTAINER forwarder
# status` needs no --config. The container's paths: inbox and quarantine as their own volumes, the
# outbox and the sent archive in the state volume. The log goes to stderr (`docker logs`); there
# is no journald here.
ENV FORWARDER_CONFIG=/etc/forwarder/forwarder.toml \
    FORWARDER_WATCH__PATHS='["/inbox"]' \
    FORWARDER_QUARANTINE__DIR=/quarantine \
    FORWARDER_OUTBOX__PATH=/var/lib/forwarder/outbox.sqlite3 \
    FORWARDER_DISPOSITION__ARCHIVE_DIR=/var/lib/forwarder/sent \
    FORWARDER_LOG__TARGET=stderr

# Create the mount points owned by the user: new named volumes copy this ownership, so the
# daemon can write them without running as root.
RUN mkdir -p /inbox /quarantine /var/lib/forwarder/sent \
    && chown forwarder:forwarder /inbox /quarantine /var/lib/forwarder /var/lib/forwarder/sent

# Data that must outlive the container: files to send, rejected files, the outbox.
VOLUME ["/inbox", "/quarantine", "/var/lib/forwarder"]

# Relative paths at run time resolve in the state directory.
WORKDIR /var/lib/forwarder

# Drop root for good; numeric, so Kubernetes' runAsNonRoot can check it (10001 = forwarder).
USER 10001:10001

# `docker stop` sends SIGTERM (the default, stated): the daemon stops taking files and lets
# in-flight C-STOREs finish for up to shutdown_timeout (30 s), so give it
# `docker stop -t 40` / compose `stop_grace_period: 40s` (Docker's default is only 10 s).
STOPSIGNAL SIGTERM

# Exit 0 while the daemon's heartbeat is fresh and no destination has been paused too long.
# Start period: the first heartbeat comes once the outbox is open and the inbox is scanned.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["forwarder", "health"]

# Exec form: PID 1 is the forwarder itself, no shell in between, so SIGTERM reaches it and its
# handler runs. No tini/--init is needed: it starts no child processes, so there are no zombies
# to reap (add `docker run --init` if a future version shells out).
ENTRYPOINT ["forwarder"]

# Default command: the daemon with the config in FORWARDER_CONFIG (`-e FORWARDER_CONFIG=...` points
# it, the health check and `docker exec` alike at another file). `docker run IMAGE send ...` runs
# another command.
CMD ["run"]
