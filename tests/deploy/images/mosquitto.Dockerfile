# Stand-in for eclipse-mosquitto:2.0 from Debian's mosquitto package (tests only: no image
# registry is reachable here). Same paths, the same uid 1883, started as root and dropping
# to user mosquitto as the official image does.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
LABEL org.iot-orders.stand-in="tests/deploy"
RUN groupadd --system --gid 1883 mosquitto \
 && useradd --system --uid 1883 --gid 1883 --home-dir /mosquitto --no-create-home mosquitto \
 && apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients netcat-openbsd \
 && rm -rf /var/cache/apt/archives/*.deb \
 && ln -s /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so /usr/lib/ \
 && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log \
 && chown -R mosquitto:mosquitto /mosquitto
EXPOSE 1883
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
