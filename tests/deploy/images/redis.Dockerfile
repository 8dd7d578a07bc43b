# Stand-in for redis:7 from Debian's redis-server package (tests only). The same uid 999,
# data in /data (a new volume takes the folder's owner), config under /usr/local/etc/redis.
# The official image is built with protected mode off (the container network is its
# fence); Debian's binary has it on, refusing other containers: so a wrapper first in PATH.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
LABEL org.iot-orders.stand-in="tests/deploy"
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid 999 --home-dir /data --no-create-home redis \
 && apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/cache/apt/archives/*.deb \
 && mkdir -p /data /usr/local/etc/redis \
 && chown redis:redis /data \
 && printf '#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n' \
      > /usr/local/bin/redis-server \
 && chmod 755 /usr/local/bin/redis-server
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
