# The peermirror Caddy image, built the way Caddy plugins are built.
#   docker build -f xcaddy.Dockerfile -t peermirror:dev .
FROM golang:1.26 AS build
ENV CGO_ENABLED=0
RUN go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
WORKDIR /src
COPY . .
# @v0.0.0 with a local replacement: xcaddy then needs no published version
RUN xcaddy build v2.11.9 --output /out/caddy \
	--with github.com/peermirror/peermirror@v0.0.0=/src

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/caddy /usr/bin/caddy
COPY Caddyfile.example /etc/caddy/Caddyfile
# the mirror port; the admin API stays on localhost:2019
EXPOSE 30020
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
