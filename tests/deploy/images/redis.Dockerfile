# Stand-in for redis:7 from Debian's redis-server package (tests only). The same uid 999,
# data in /data (a new volume takes the folder's owner), config under /usr/local/etc/redis.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid 999 --home-dir /data --no-create-home redis \
 && apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/cache/apt/archives/*.deb \
 && mkdir -p /data /usr/local/etc/redis \
 && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
