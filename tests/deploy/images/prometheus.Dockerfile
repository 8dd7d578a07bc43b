# Stand-in for prom/prometheus from Debian's prometheus package (tests only): the binary as
# the entrypoint, user nobody, data in /prometheus; wget for the compose healthcheck.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
LABEL org.iot-orders.stand-in="tests/deploy"
# libjs-moment-timezone's 214 MB of time-zone data for the old web UI are never unpacked:
# the API and /-/ready need none of it.
RUN echo 'path-exclude=/usr/share/javascript/moment-timezone/*' \
      > /etc/dpkg/dpkg.cfg.d/no-moment-timezone \
 && apt-get install -y -qq --no-install-recommends prometheus wget \
 && rm -rf /var/cache/apt/archives/*.deb \
 && mkdir -p /prometheus /etc/prometheus \
 && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
