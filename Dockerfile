# One image for the cloud services: order-bridge, order-pipeline, fleet-sim, order-enrol.
# Built with BuildKit (DOCKER_BUILDKIT=1, or buildx). BASE_IMAGE is any Debian-like image
# with python3 ≥ 3.11 and its venv module; the tests build on a local Debian bookworm
# (docs/how-to/deploy-docker.md). A private CA for the package index goes in as a build
# secret, never a layer:  docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE_IMAGE=python:3.11-slim

# The sources alone, in a stage of their own that is mounted below, not copied: each
# layer of the image is then a pip install, and a code change rebuilds the last one only.
FROM scratch AS source
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY servicekit servicekit
COPY edge_agent edge_agent
COPY bridge bridge
COPY pipeline pipeline
COPY enrolment enrolment
COPY testrig testrig
COPY fleet fleet

FROM ${BASE_IMAGE}
ENV PATH=/opt/orders/bin:$PATH
WORKDIR /app
# Exactly the locked versions, checked by hash; setuptools too (requirements/build.txt),
# which builds the package below without a download.
RUN --mount=type=bind,source=requirements,target=/tmp/requirements \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && useradd --system --uid 10001 --home-dir /app orders \
 && python3 -m venv /opt/orders \
 && pip install --no-cache-dir --disable-pip-version-check --require-hashes \
      -r /tmp/requirements/fleet.txt -r /tmp/requirements/build.txt
# The package itself, offline: nothing resolved, nothing downloaded.
RUN --mount=type=bind,from=source,target=/src,rw \
    pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
      --no-build-isolation /src
USER orders
# Each service picks its command in docker-compose.yml; settings come from ORDERS_* variables.
CMD ["order-bridge", "--help"]
