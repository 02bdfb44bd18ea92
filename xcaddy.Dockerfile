# The peermirror image: Caddy v2.11.9 with the peermirror plugin, built by
# xcaddy from this source tree in Caddy's builder image, then copied into
# the matching Caddy image (the caddy:<version>-builder pattern).
#   docker build -f xcaddy.Dockerfile -t peermirror:dev .
# deploytest runs the same xcaddy build step without Docker.
FROM caddy:2.11.9-builder AS builder
# The plugin needs Go 1.26.6 or newer (containerd v2.4.2): with an older Go
# in the builder, GOTOOLCHAIN=auto fetches it. Static binary; no file
# capabilities (XCADDY_SETCAP=0), since the chart drops every capability
# and needs no port below 1024.
ENV GOTOOLCHAIN=auto CGO_ENABLED=0 XCADDY_SETCAP=0
COPY . /src/peermirror
# @v0.0.0 with a local replacement: xcaddy then needs no published version.
RUN xcaddy build v2.11.9 \
	--with github.com/peermirror/peermirror@v0.0.0=/src/peermirror \
	--output /usr/bin/caddy

FROM caddy:2.11.9
COPY --from=builder /usr/bin/caddy /usr/bin/caddy
COPY Caddyfile.example /etc/caddy/Caddyfile
# the mirror and the DHT; the image's default command runs the Caddyfile
EXPOSE 30020 5001
