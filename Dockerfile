# One image for the cloud services: order-bridge, order-pipeline, fleet-sim.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY edge_agent edge_agent
COPY bridge bridge
COPY pipeline pipeline
COPY fleet fleet
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fleet]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app orders
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'iot-orders[fleet]' && rm -rf /wheels
USER orders
WORKDIR /app
# Each service picks its command in docker-compose.yml; settings come from ORDERS_* variables.
CMD ["order-bridge", "--help"]
