# One image for the cloud services: order-bridge, order-pipeline, fleet-sim, order-enrol.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/fleet.txt requirements/fleet.txt
COPY schemas schemas
COPY servicekit servicekit
COPY edge_agent edge_agent
COPY bridge bridge
COPY pipeline pipeline
COPY enrolment enrolment
COPY testrig testrig
COPY fleet fleet
# Exactly the locked versions, checked by hash; then the package itself without resolving.
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements/fleet.txt \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app orders
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && rm -rf /wheels
USER orders
WORKDIR /app
# Each service picks its command in docker-compose.yml; settings come from ORDERS_* variables.
CMD ["order-bridge", "--help"]
